"""wakeproxy.config: the YAML contract, its error messages and the CLI's handling of them."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from pathlib import Path

import pytest
from wakeproxy import cli
from wakeproxy.config import (
    AcmeConfig,
    Address,
    Config,
    ConfigError,
    DockerConfig,
    ForwardedConfig,
    IdleConfig,
    ListenConfig,
    SourcesConfig,
    StatusConfig,
    TlsConfig,
    WakeConfig,
    load_config,
    parse_address,
    parse_config,
    parse_duration,
)

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "config" / "wakeproxy.yaml"


def error_of(text: str, source: str = "wp.yaml") -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, source)
    return str(exc.value)


def assert_error(text: str, line: int, key: str, *fragments: str) -> str:
    """The error names wp.yaml, the 1-based `line` and the dotted `key` (as `file:line: key:`)."""
    msg = error_of(text)
    assert msg.startswith(f"wp.yaml:{line}: {key}: "), msg
    for frag in fragments:
        assert frag in msg, (frag, msg)
    return msg


# --- defaults ------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n"])
def test_empty_file_gives_defaults(text):
    cfg = parse_config(text, "empty.yaml")
    assert cfg == Config(source="empty.yaml")
    assert cfg.listen.http == Address("0.0.0.0", 80)
    assert cfg.listen.https == Address("0.0.0.0", 443)
    assert cfg.docker == DockerConfig(url=None, networks=())
    assert cfg.state_dir == Path("/var/lib/wakeproxy")
    assert cfg.default_host is None
    assert cfg.sources == SourcesConfig(wakeproxy=True, docksal=True, nginx_proxy=True, traefik=True)
    assert cfg.forwarded.trusted_proxies == ()
    assert cfg.wake == WakeConfig(strategy="auto", timeout=60.0, retry_after=10.0, ignore_user_agents=())
    assert cfg.idle == IdleConfig(timeout=1800.0, action="stop", stop_timeout=10.0)
    assert cfg.status == StatusConfig(listen=Address("127.0.0.1", 8099))
    assert cfg.tls == TlsConfig(certs_dir=None, default_cert=None, default_key=None, redirect=True, hsts=0.0)
    assert cfg.acme == AcmeConfig(enabled=False, directory="https://acme-v02.api.letsencrypt.org/directory",
                                  email=None, ca_bundle=None, eab_kid=None, eab_hmac_key=None, key_type="ec256",
                                  concurrency=2)
    assert cfg.source == "empty.yaml"


@pytest.mark.parametrize("section", ["listen", "docker", "sources", "forwarded", "wake", "idle", "status", "tls", "acme"])
def test_null_or_empty_section_keeps_its_defaults(section):
    assert parse_config(f"{section}:\n") == Config(source="<string>")
    assert parse_config(f"{section}: {{}}\n") == Config(source="<string>")


def test_shipped_config_parses_to_the_documented_defaults():
    cfg = parse_config(SHIPPED.read_text(encoding="utf-8"), str(SHIPPED))
    assert cfg.source == str(SHIPPED)
    assert dataclasses.replace(cfg, source="<defaults>") == Config()


def test_shipped_config_loads_with_an_absolute_state_dir():
    cfg = load_config(SHIPPED)
    assert cfg.state_dir == Path("/var/lib/wakeproxy")
    assert cfg.listen == ListenConfig()


# --- listen --------------------------------------------------------------------------


def test_listen_host_port():
    cfg = parse_config('listen:\n  http: "127.0.0.1:8080"\n  https: "10.1.2.3:8443"\n')
    assert cfg.listen.http == Address("127.0.0.1", 8080)
    assert cfg.listen.https == Address("10.1.2.3", 8443)


def test_listen_bare_port_binds_all_ipv4():
    cfg = parse_config("listen:\n  http: 8080\n")
    assert cfg.listen.http == Address("0.0.0.0", 8080)
    assert cfg.listen.https == Address("0.0.0.0", 443)  # untouched


def test_listen_empty_host_binds_all_ipv4():
    assert parse_config('listen:\n  http: ":8081"\n').listen.http == Address("0.0.0.0", 8081)


def test_listen_ipv6_literal():
    cfg = parse_config('listen:\n  https: "[::1]:8443"\n')
    assert cfg.listen.https == Address("::1", 8443)
    assert str(cfg.listen.https) == "[::1]:8443"
    assert str(Address("0.0.0.0", 80)) == "0.0.0.0:80"


def test_listen_hostname():
    assert parse_config('listen:\n  http: "localhost:80"\n').listen.http == Address("localhost", 80)


@pytest.mark.parametrize("which", ["http", "https"])
def test_listen_null_disables_one_listener(which):
    cfg = parse_config(f"listen:\n  {which}: null\n")
    assert getattr(cfg.listen, which) is None
    other = "https" if which == "http" else "http"
    assert getattr(cfg.listen, other) is not None


def test_both_listeners_null_is_an_error():
    assert_error("listen:\n  http: null\n  https: ~\n", 2, "listen", "at least one")
    assert_error("listen: {http: null, https: null}\n", 1, "listen", "at least one")


@pytest.mark.parametrize(
    "value, fragment",
    [
        ('"nope"', "not host:port"),
        ('"8080"', "not host:port"),  # a bare port must be a number, not a string
        ('"::1:8443"', "not host:port"),  # IPv6 needs brackets
        ('"host:0"', "out of range"),
        ('"host:65536"', "out of range"),
        ("70000", "out of range"),
        ("0", "out of range"),
        ('"host:-1"', "not host:port"),
        ('"[::1]"', "not host:port"),
        ("true", "host:port"),
        ("[1, 2]", "host:port"),
        ("{a: 1}", "host:port"),
    ],
)
def test_listen_bad_address(value, fragment):
    assert_error(f"# header\nlisten:\n  http: {value}\n", 3, "listen.http", fragment)


def test_parse_address_direct():
    assert parse_address(None) is None
    assert parse_address(443) == Address("0.0.0.0", 443)
    assert parse_address("[fe80::1]:80") == Address("fe80::1", 80)
    assert parse_address("a.example:65535") == Address("a.example", 65535)
    with pytest.raises(ValueError):
        parse_address(True)
    with pytest.raises(ValueError):
        parse_address(1.5)


# --- docker ----------------------------------------------------------------------------


def test_docker_url_and_networks():
    cfg = parse_config(
        "docker:\n"
        '  url: "unix:///run/user/1000/docker.sock"\n'
        "  networks: [proxy, bridge]\n"
    )
    assert cfg.docker == DockerConfig(url="unix:///run/user/1000/docker.sock", networks=("proxy", "bridge"))


def test_docker_null_url_and_networks():
    cfg = parse_config("docker:\n  url: null\n  networks: null\n")
    assert cfg.docker == DockerConfig()


def test_docker_networks_block_list():
    cfg = parse_config("docker:\n  networks:\n    - a\n    - b\n")
    assert cfg.docker.networks == ("a", "b")


def test_docker_networks_not_a_list():
    assert_error("docker:\n  networks: proxy\n", 2, "docker.networks", "expected a list")


def test_docker_networks_bad_item_names_the_index_and_its_line():
    assert_error("docker:\n  networks:\n    - a\n    - 5\n", 4, "docker.networks[1]", "non-empty string")


@pytest.mark.parametrize("value", ["5", "''", "[a]", "true"])
def test_docker_url_wrong_type(value):
    assert_error(f"docker:\n  url: {value}\n", 2, "docker.url", "non-empty string")


# --- state_dir -----------------------------------------------------------------------


def test_state_dir_absolute():
    assert parse_config("state_dir: /srv/wp\n").state_dir == Path("/srv/wp")


def test_state_dir_tilde_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_config("state_dir: ~/wp\n").state_dir == tmp_path / "wp"


def test_state_dir_relative_is_resolved_against_the_config_folder(tmp_path, monkeypatch):
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    path = conf_dir / "wakeproxy.yaml"
    path.write_text("state_dir: state/sub\n", encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(path)
    assert cfg.state_dir == (conf_dir / "state" / "sub").resolve()
    assert cfg.state_dir.is_absolute()
    # …also when the config path itself is relative
    monkeypatch.chdir(tmp_path)
    assert load_config("etc/wakeproxy.yaml").state_dir == (conf_dir / "state" / "sub").resolve()


def test_state_dir_absolute_is_kept_by_load_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"state_dir: {tmp_path / 'abs'}\n", encoding="utf-8")
    assert load_config(path).state_dir == tmp_path / "abs"


@pytest.mark.parametrize("value", ["5", "''", "null", "[a]"])
def test_state_dir_wrong_type(value):
    assert_error(f"listen:\n  http: 80\nstate_dir: {value}\n", 3, "state_dir", "non-empty string")


# --- default_host ----------------------------------------------------------------------


def test_default_host_is_lower_cased():
    cfg = parse_config("default_host: Fallback.Example.COM\nnames: {reserved: {fallback.example.com: landing}}\n")
    assert cfg.default_host == "fallback.example.com"
    assert cfg.names.reserved == (("fallback.example.com", "landing"),)


def test_default_host_needs_its_group_in_names_reserved():
    assert_error("default_host: fallback.test\n", 1, "default_host", "names.reserved")
    assert_error("default_host: fallback.test\nnames: {reserved: {other.test: x}}\n", 1, "default_host",
                 "names.reserved")


def test_default_host_null():
    assert parse_config("default_host: null\n").default_host is None


@pytest.mark.parametrize("value", ['"a b"', "-x.test", "x..test", "5", "[a]", '""', '"a/b"'])
def test_default_host_invalid(value):
    assert_error(f"default_host: {value}\n", 1, "default_host", "not a hostname")


def test_default_host_accepts_every_host_a_label_can_declare():
    assert parse_config("default_host: my_app.test\nnames: {reserved: {my_app.test: g}}\n").default_host == "my_app.test"


# --- sources -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["wakeproxy", "docksal", "nginx_proxy", "traefik"])
def test_each_source_can_be_switched_off(name):
    cfg = parse_config(f"sources:\n  {name}: false\n")
    expected = dataclasses.replace(SourcesConfig(), **{name: False})
    assert cfg.sources == expected


def test_sources_all_explicit():
    cfg = parse_config("sources: {wakeproxy: false, docksal: true, nginx_proxy: false, traefik: true}\n")
    assert cfg.sources == SourcesConfig(wakeproxy=False, docksal=True, nginx_proxy=False, traefik=True)


@pytest.mark.parametrize("value", ['"yes"', '"false"', "1", "0", "null", "[true]"])
def test_sources_need_real_booleans(value):
    assert_error(f"sources:\n  traefik: true\n  docksal: {value}\n", 3, "sources.docksal", "true or false")


def test_sources_dash_spelling_is_unknown():
    assert_error("sources:\n  nginx-proxy: false\n", 2, "sources.nginx-proxy", "unknown key", "nginx_proxy")


# --- forwarded -------------------------------------------------------------------------------


def test_trusted_proxies_cidrs():
    cfg = parse_config('forwarded:\n  trusted_proxies: ["10.0.0.0/8", "192.0.2.1", "fd00::/8", "172.16.5.4/12"]\n')
    assert cfg.forwarded.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.0.2.1/32"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("172.16.0.0/12"),  # host bits are forgiven
    )


@pytest.mark.parametrize("value", ['"10.0.0.0/33"', '"nope"', "10", "{a: b}"])
def test_trusted_proxies_bad_entry(value):
    msg = assert_error(
        f'forwarded:\n  trusted_proxies:\n    - "10.0.0.0/8"\n    - {value}\n', 4, "forwarded.trusted_proxies[1]"
    )
    assert "CIDR" in msg


def test_trusted_proxies_not_a_list():
    assert_error('forwarded:\n  trusted_proxies: "10.0.0.0/8"\n', 2, "forwarded.trusted_proxies", "expected a list")


def test_forwarded_trusts():
    fwd = ForwardedConfig(trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")))
    assert fwd.trusts("10.1.2.3")
    assert fwd.trusts("10.255.255.255")
    assert not fwd.trusts("11.0.0.1")
    assert not fwd.trusts("192.0.2.1")
    assert fwd.trusts("fd00::1")
    assert fwd.trusts("fd12:3456::1%eth0")  # a zone index is ignored
    assert not fwd.trusts("fe80::1")
    assert fwd.trusts("::ffff:10.0.0.7")  # IPv4-mapped IPv6 counts as the IPv4 address
    assert not fwd.trusts("::ffff:11.0.0.7")
    assert not fwd.trusts("")
    assert not fwd.trusts("not-an-ip")


def test_nobody_is_trusted_by_default():
    assert not ForwardedConfig().trusts("127.0.0.1")
    assert not ForwardedConfig().trusts("10.0.0.1")


# --- wake ------------------------------------------------------------------------------------


def test_wake_section():
    cfg = parse_config(
        "wake:\n"
        "  strategy: hold\n"
        "  timeout: 2m\n"
        "  retry_after: 0\n"
        "  ignore_user_agents: [bot, '^curl/']\n"
    )
    assert (cfg.wake.strategy, cfg.wake.timeout, cfg.wake.retry_after) == ("hold", 120.0, 0.0)
    assert [p.pattern for p in cfg.wake.ignore_user_agents] == ["bot", "^curl/"]


@pytest.mark.parametrize("strategy", ["auto", "hold", "page"])
def test_wake_strategies(strategy):
    assert parse_config(f"wake:\n  strategy: {strategy}\n").wake.strategy == strategy


@pytest.mark.parametrize("value, seconds", [("90", 90.0), ("1.5", 1.5), ("250ms", 0.25), ("1h", 3600.0)])
def test_wake_timeout_durations(value, seconds):
    assert parse_config(f"wake:\n  timeout: {value}\n").wake.timeout == pytest.approx(seconds)


def test_wake_ignores_user_agents_case_insensitively():
    wake = parse_config("wake:\n  ignore_user_agents: [crawler, UptimeRobot]\n").wake
    assert wake.ignores("SomeCRAWLER/1.0")
    assert wake.ignores("Mozilla/5.0+(compatible; uptimerobot/2.0)")
    assert not wake.ignores("Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0")
    assert not wake.ignores("")
    assert not WakeConfig().ignores("Googlebot")


@pytest.mark.parametrize(
    "line, key, fragment",
    [
        ("  strategy: sometimes", "wake.strategy", "auto, hold, page"),
        ("  strategy: HOLD", "wake.strategy", "auto, hold, page"),
        ("  timeout: 0", "wake.timeout", "more than 0"),
        ("  timeout: 0s", "wake.timeout", "more than 0"),
        ("  timeout: -5", "wake.timeout", "negative"),
        ("  timeout: soon", "wake.timeout", "not a duration"),
        ("  timeout: true", "wake.timeout", "duration"),
        ("  retry_after: 10 minutes", "wake.retry_after", "not a duration"),
        ("  ignore_user_agents: bot", "wake.ignore_user_agents", "expected a list"),
        ("  ignore_user_agents: ['(unclosed']", "wake.ignore_user_agents[0]", "regular expression"),
        ("  ignore_user_agents: [5]", "wake.ignore_user_agents[0]", "regular expression"),
        ("  timout: 5s", "wake.timout", "unknown key"),
    ],
)
def test_wake_errors(line, key, fragment):
    assert_error(f"listen:\n  http: 80\nwake:\n{line}\n", 4, key, fragment)


@pytest.mark.parametrize("key", ["timeout", "retry_after"])
def test_wake_durations_reject_nan(key):
    assert_error(f"wake:\n  {key}: .nan\n", 2, f"wake.{key}", "duration")


# --- idle, status, tls, acme --------------------------------------------------------------------


def test_idle_section():
    cfg = parse_config("idle:\n  timeout: 0\n  action: pause\n  stop_timeout: 1m\n")
    assert cfg.idle == IdleConfig(timeout=0.0, action="pause", stop_timeout=60.0)
    assert parse_config("idle:\n  timeout: 2h\n").idle.timeout == 7200.0


@pytest.mark.parametrize(
    "line, key, fragment",
    [
        ("  action: kill", "idle.action", "stop, pause"),
        ("  timeout: later", "idle.timeout", "not a duration"),
        ("  timeout: -1", "idle.timeout", "negative"),
        ("  stop_timeout: [1]", "idle.stop_timeout", "not a duration"),
        ("  stop: 5", "idle.stop", "unknown key"),
    ],
)
def test_idle_errors(line, key, fragment):
    assert_error(f"idle:\n{line}\n", 2, key, fragment)


def test_status_listen():
    assert parse_config('status:\n  listen: "0.0.0.0:9000"\n').status.listen == Address("0.0.0.0", 9000)
    assert parse_config("status:\n  listen: 9001\n").status.listen == Address("0.0.0.0", 9001)
    assert parse_config("status:\n  listen: null\n").status.listen is None
    assert_error('status:\n  listen: "nowhere"\n', 2, "status.listen", "host:port")


def test_tls_section(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = parse_config(
        "tls:\n"
        "  certs_dir: ~/certs\n"
        "  default_cert: /etc/wp/d.crt\n"
        "  default_key: /etc/wp/d.key\n"
        "  redirect: false\n"
        "  hsts: 180d\n"
    )
    assert cfg.tls == TlsConfig(certs_dir=tmp_path / "certs", default_cert=Path("/etc/wp/d.crt"),
                                default_key=Path("/etc/wp/d.key"), redirect=False, hsts=180 * 86400.0)


@pytest.mark.parametrize("value, seconds", [("0", 0.0), ("false", 0.0), ("null", 0.0), ("3600", 3600.0), ("1d", 86400.0)])
def test_tls_hsts(value, seconds):
    assert parse_config(f"tls:\n  hsts: {value}\n").tls.hsts == seconds


@pytest.mark.parametrize(
    "text, line, key, fragment",
    [
        ("tls:\n  default_cert: /a.crt\n", 2, "tls.default_cert", "together"),
        ("tls:\n  default_key: /a.key\n", 2, "tls.default_cert", "together"),
        ("tls:\n  redirect: sometimes\n", 2, "tls.redirect", "true or false"),
        ("tls:\n  hsts: true\n", 2, "tls.hsts", "duration"),
        ("tls:\n  hsts: forever\n", 2, "tls.hsts", "not a duration"),
        ("tls:\n  certs_dir: ''\n", 2, "tls.certs_dir", "non-empty string"),
        ("tls:\n  cert_dir: /x\n", 2, "tls.cert_dir", "unknown key"),
    ],
)
def test_tls_errors(text, line, key, fragment):
    assert_error(text, line, key, fragment)


def test_acme_section():
    cfg = parse_config(
        "acme:\n"
        "  enabled: true\n"
        '  directory: "https://localhost:14000/dir"\n'
        "  email: ops@example.com\n"
        "  ca_bundle: /etc/pebble.pem\n"
        "  eab_kid: kid\n"
        "  eab_hmac_key: key\n"
        "  key_type: rsa4096\n"
        "  concurrency: 5\n"
    )
    assert cfg.acme == AcmeConfig(True, "https://localhost:14000/dir", "ops@example.com", Path("/etc/pebble.pem"),
                                  "kid", "key", "rsa4096", 5)


@pytest.mark.parametrize(
    "line, key, fragment",
    [
        ("  enabled: yes please", "acme.enabled", "true or false"),
        ('  directory: "ftp://x/dir"', "acme.directory", "http(s) URL"),
        ("  directory: letsencrypt", "acme.directory", "http(s) URL"),
        ("  key_type: dsa", "acme.key_type", "ec256"),
        ("  concurrency: 0", "acme.concurrency", "at least 1"),
        ("  concurrency: 1.5", "acme.concurrency", "at least 1"),
        ("  concurrency: true", "acme.concurrency", "at least 1"),
        ("  email: 5", "acme.email", "non-empty string"),
        ("  eab_kid: kid", "acme.eab_kid", "together"),
        ("  eab_hmac_key: key", "acme.eab_kid", "together"),
    ],
)
def test_acme_errors(line, key, fragment):
    assert_error(f"acme:\n{line}\n", 2, key, fragment)


# --- structural errors ------------------------------------------------------------------------


def test_unknown_top_level_key():
    msg = assert_error("listen:\n  http: 80\nlisten_http: 80\n", 3, "listen_http", "unknown key")
    for known in ("acme", "default_host", "docker", "forwarded", "idle", "listen", "sources", "state_dir", "status",
                  "tls", "wake"):
        assert known in msg


def test_unknown_nested_key():
    assert_error("docker:\n  url: null\n  network: [a]\n", 3, "docker.network", "unknown key", "networks")
    assert_error("listen:\n\n  htp: 80\n", 3, "listen.htp", "unknown key", "http, https")
    assert_error("forwarded:\n  trusted: []\n", 2, "forwarded.trusted", "unknown key")


def test_duplicate_key_top_level():
    assert_error("default_host: a.test\nstate_dir: /x\ndefault_host: b.test\n", 3, "default_host", "twice")


def test_duplicate_key_nested():
    assert_error("listen:\n  http: 80\n  https: 443\n  http: 81\n", 4, "listen.http", "twice")


@pytest.mark.parametrize(
    "text, line, key",
    [
        ("listen: 80\n", 1, "listen"),
        ("docker: [a]\n", 1, "docker"),
        ("state_dir: /x\nsources: true\n", 2, "sources"),
        ("forwarded: nope\n", 1, "forwarded"),
    ],
)
def test_section_that_is_not_a_mapping(text, line, key):
    assert_error(text, line, key, "expected a mapping")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_not_a_mapping(text):
    assert_error(text, 1, "(top level)", "expected a mapping")


def test_bad_yaml_names_file_and_line():
    msg = error_of("listen:\n  http: 80\n  https: [unclosed\nstate_dir: /x\n")
    assert msg.startswith("wp.yaml:"), msg
    assert "not valid YAML" in msg
    line = int(re.match(r"wp\.yaml:(\d+):", msg).group(1))
    assert line in (3, 4)  # the unclosed list, or where PyYAML gave up on it


def test_bad_yaml_indentation_line():
    msg = error_of("listen:\n  http: 80\n https: 443\n")
    assert re.match(r"wp\.yaml:3: not valid YAML", msg), msg


def test_bad_yaml_tab_line():
    msg = error_of("docker:\n\turl: x\n")
    assert re.match(r"wp\.yaml:2: not valid YAML", msg), msg


def test_error_source_default_name():
    with pytest.raises(ConfigError, match=r"^<string>:1: listen: "):
        parse_config("listen: 1.5\n")


def test_load_config_errors_name_the_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("listen:\n  http: 80\n  https: nope\n", encoding="utf-8")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith(f"{path}:3: listen.https: ")


def test_load_config_missing_file(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).startswith(f"{path}: cannot read")


def test_config_is_frozen():
    cfg = parse_config("")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.default_host = "x"  # type: ignore[misc]


# --- parse_duration -------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, seconds",
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("250ms", 0.25),
        ("1.5h", 5400.0),
        (" 10 s ", 10.0),
        ("45", 45.0),
        ("0", 0.0),
        (0, 0.0),
        (12, 12.0),
        (2.5, 2.5),
        ("1h30m", 5400.0),  # Go's compound form (Docksal's variables take it)
        ("10m0s", 600.0),
        ("0.5h", 1800.0),
        ("168h", 604800.0),
        ("2m05s", 125.0),  # what format_duration writes reads back
        ("1d12h", 129600.0),
        ("1s500ms", 1.5),
    ],
)
def test_parse_duration(value, seconds):
    result = parse_duration(value)
    assert isinstance(result, float)
    assert result == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value", [True, False, -1, -0.5, "-5s", "5x", "s", "", "5 m s", "1e3", "5M", None, [], "ten", "1.s",
              "1h30", "1h 30m", "h30m", "1h" * 9, "9" * 400 + "h1m"]
)
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError):
        parse_duration(value)



def test_parse_duration_rejects_nan():
    with pytest.raises(ValueError):
        parse_duration(float("nan"))  # today: returns nan


# --- the CLI --------------------------------------------------------------------------------


BAD = "listen:\n  http: 80\n  https: 'nope'\n"


@pytest.fixture
def bad_config(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD, encoding="utf-8")
    return path


@pytest.fixture
def good_config(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text("listen:\n  http: 8080\n  https: null\nstate_dir: st\n", encoding="utf-8")
    return path


@pytest.fixture
def nothing_starts(monkeypatch):
    """Any attempt to run the proxy or exec mitmweb fails the test."""

    def boom(*a, **k):
        raise AssertionError("the proxy must not start")

    monkeypatch.setattr(cli, "_serve", boom)
    monkeypatch.setattr(cli, "build_master", boom)
    monkeypatch.setattr(cli.os, "execvp", boom)


def test_cli_check_bad_config(bad_config, capsys, nothing_starts):
    rc = cli.main(["check", "--config", str(bad_config)])
    out, err = capsys.readouterr()
    assert rc == 2
    assert f"{bad_config}:3: listen.https:" in err
    assert out == ""


def test_cli_check_short_option(bad_config, capsys, nothing_starts):
    assert cli.main(["check", "-c", str(bad_config)]) == 2
    assert f"{bad_config}:3: listen.https:" in capsys.readouterr().err


def test_cli_check_missing_file(tmp_path, capsys, nothing_starts):
    assert cli.main(["check", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


def test_cli_check_good_config(good_config, capsys, nothing_starts):
    rc = cli.main(["check", "--config", str(good_config)])
    out, err = capsys.readouterr()
    assert rc == 0
    assert err == ""
    assert str(good_config) in out and "ok" in out
    assert "0.0.0.0:8080" in out
    assert str(good_config.parent / "st") in out


@pytest.mark.parametrize("argv", [["--config"], ["run", "--config"], ["-v", "--config"]])
def test_cli_run_bad_config_exits_2_without_starting(argv, bad_config, capsys, nothing_starts):
    rc = cli.main([*argv, str(bad_config)])
    assert rc == 2
    assert f"{bad_config}:3: listen.https:" in capsys.readouterr().err


def test_cli_web_bad_config_exits_2_without_exec(bad_config, capsys, nothing_starts):
    assert cli.main(["web", "--config", str(bad_config), "--set", "x=y"]) == 2
    assert f"{bad_config}:3: listen.https:" in capsys.readouterr().err


@pytest.mark.parametrize("flags, verbosity", [([], "info"), (["-v"], "debug"), (["--quiet"], "warn")])
def test_cli_run_good_config_serves_with_verbosity(flags, verbosity, good_config, monkeypatch):
    from wakeproxy.planes import supervisor

    calls = []

    async def fake_serve(path, verb):
        calls.append(("one process", path, verb))

    class FakeSupervisor:
        def __init__(self, path, verb):
            calls.append(("supervisor", path, verb))

        def run(self):
            return 0

    monkeypatch.setattr(cli, "_serve", fake_serve)
    monkeypatch.setattr(supervisor, "Supervisor", FakeSupervisor)
    assert cli.main([*flags, "--config", str(good_config)]) == 0  # workers: auto → the supervisor
    text = good_config.read_text()
    good_config.write_text(text + "\nworkers: 0\n")
    assert cli.main([*flags, "--config", str(good_config)]) == 0
    assert calls == [("supervisor", str(good_config), verbosity), ("one process", str(good_config), verbosity)]


def test_cli_check_rejects_extra_arguments(good_config, capsys, nothing_starts):
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", "--config", str(good_config), "--bogus"])
    assert exc.value.code == 2
    assert "--bogus" in capsys.readouterr().err


# --- limits ------------------------------------------------------------------------------------


def test_limits_defaults_and_values():
    from wakeproxy.config import LimitsConfig

    assert parse_config("").limits == LimitsConfig(header_timeout=10.0, idle_timeout=60.0, max_header_bytes=32768,
                                                   max_connections=None, connection_reserve=512)
    cfg = parse_config("limits:\n  header_timeout: 2s\n  idle_timeout: 1m\n  max_header_bytes: 8192\n"
                       "  max_connections: 100\n  connection_reserve: 64\n")
    assert cfg.limits == LimitsConfig(2.0, 60.0, 8192, 100, 64)
    assert parse_config("limits: {max_connections: auto}").limits.max_connections is None


@pytest.mark.parametrize("text,key", [
    ("limits: {header_timeout: 0}", "limits.header_timeout"),
    ("limits: {idle_timeout: -1}", "limits.idle_timeout"),
    ("limits: {max_header_bytes: 100}", "limits.max_header_bytes"),
    ("limits: {max_header_bytes: true}", "limits.max_header_bytes"),
    ("limits: {max_connections: 0}", "limits.max_connections"),
    ("limits: {max_connections: many}", "limits.max_connections"),
    ("limits: {connection_reserve: 1}", "limits.connection_reserve"),
    ("limits: {max_conns: 1}", "limits.max_conns"),
])
def test_limits_errors_name_the_key(text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_config(text)


def test_a_config_change_that_needs_a_restart_is_refused_live(tmp_path):
    """A running proxy applies a changed wakeproxy_config, except the sections set up once."""
    from mitmproxy import exceptions
    from mitmproxy.test import taddons
    from wakeproxy.core import WakeProxy
    from wakeproxy.runtime import Runtime

    first = tmp_path / "a.yaml"
    first.write_text(f"state_dir: {tmp_path / 's'}\nidle: {{timeout: 5m}}\n")
    addon = WakeProxy(Runtime())
    with taddons.context(addon) as tctx:
        tctx.configure(addon, wakeproxy_config=str(first))
        addon._running = True  # as after running(); the Docker view is not started here
        addon._restart_view = lambda: None  # type: ignore[method-assign]
        live = tmp_path / "b.yaml"
        live.write_text(f"state_dir: {tmp_path / 's'}\nidle: {{timeout: 7m}}\n")
        tctx.configure(addon, wakeproxy_config=str(live))
        assert addon.runtime.config.idle.timeout == 420.0  # applied
        fixed = tmp_path / "c.yaml"
        fixed.write_text(f"state_dir: {tmp_path / 'other'}\nacme: {{enabled: true}}\n")
        with pytest.raises(exceptions.OptionsError, match="state_dir, acme cannot change while the proxy runs"):
            tctx.configure(addon, wakeproxy_config=str(fixed))
        assert addon.runtime.config.idle.timeout == 420.0  # the running config stands


# --- environment variables (the container way) ----------------------------------------------------


def test_environment_variables_override_the_file_and_fill_missing_sections():
    text = "idle:\n  timeout: 5m\nlisten:\n  http: 127.0.0.1:8080\n"
    env = {"WAKEPROXY_IDLE_TIMEOUT": "7m", "WAKEPROXY_HTTP": "off", "WAKEPROXY_NETWORKS": "a_default, b_default",
           "WAKEPROXY_WORKERS": "3", "WAKEPROXY_ACME": "yes", "WAKEPROXY_ACME_EMAIL": "ops@example.com",
           "WAKEPROXY_NAMES_ALLOW": "*.sandbox.example.com,{group}.example.org", "WAKEPROXY_JOIN_NETWORKS": "0",
           "WAKEPROXY_USER": "10001", "PATH": "/usr/bin", "WAKEPROXY_LISTEN_FDS": "80=3"}
    cfg = parse_config(text, "wp.yaml", env)
    assert cfg.idle.timeout == 420 and cfg.listen.http is None and cfg.listen.https == Address("0.0.0.0", 443)
    assert cfg.docker.networks == ("a_default", "b_default") and cfg.docker.join_networks is False
    assert cfg.workers == 3 and cfg.user == "10001"
    assert cfg.acme.enabled is True and cfg.acme.email == "ops@example.com"
    assert cfg.names.allow == ("*.sandbox.example.com", "{group}.example.org")
    assert parse_config("", "wp.yaml", {"WAKEPROXY_WORKERS": "auto"}).workers is None
    assert parse_config("", "wp.yaml", {}).docker.join_networks is True


@pytest.mark.parametrize(("env", "fragment"), [
    ({"WAKEPROXY_IDLE_TIMEOUT": "7x"}, "environment variable WAKEPROXY_IDLE_TIMEOUT: idle.timeout: '7x' is not a duration"),
    ({"WAKEPROXY_ACME": "maybe"}, "environment variable WAKEPROXY_ACME: acme.enabled: expected true or false"),
    ({"WAKEPROXY_IDLE_TIMOUT": "5m"}, "environment variable WAKEPROXY_IDLE_TIMOUT"),  # the typo is named, then the known
    ({"WAKEPROXY_HTTPS": "nowhere"}, "environment variable WAKEPROXY_HTTPS: listen.https:"),
    ({"WAKEPROXY_WORKERS": "-1"}, "environment variable WAKEPROXY_WORKERS: workers:"),
    ({"WAKEPROXY_STATE_DIR": "x" * 5000}, "longer than 4096"),
])
def test_a_bad_environment_variable_is_named(env, fragment):
    with pytest.raises(ConfigError) as exc:
        parse_config("", "wp.yaml", env)
    assert fragment in str(exc.value)
    if "TIMOUT" in next(iter(env)):
        assert str(exc.value).startswith("environment variable WAKEPROXY_IDLE_TIMOUT: unknown")


def test_environment_cannot_turn_a_mapping_into_a_scalar_error_without_saying_where():
    with pytest.raises(ConfigError) as exc:
        parse_config("idle: 5\n", "wp.yaml", {"WAKEPROXY_IDLE_TIMEOUT": "5m"})
    assert "idle" in str(exc.value)


def test_every_environment_variable_maps_to_a_real_key():
    from wakeproxy.config import env_keys

    for name, key in env_keys().items():
        section, _, leaf = key.partition(".")
        cfg = Config()
        assert hasattr(cfg, section), name
        if leaf:
            assert hasattr(getattr(cfg, section), leaf), name


def test_the_cli_reads_wakeproxy_config(tmp_path, monkeypatch, capsys):
    f = tmp_path / "wp.yaml"
    f.write_text("idle:\n  timeout: bogus\n")
    monkeypatch.setenv("WAKEPROXY_CONFIG", str(f))
    assert cli.main(["check"]) == cli.EXIT_CONFIG
    assert f"{f}:2: idle.timeout" in capsys.readouterr().err


def test_health_says_why_it_fails(tmp_path, monkeypatch, capsys):
    import http.server
    import json
    import threading
    import time

    reports: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            body = json.dumps(reports[-1]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        f = tmp_path / "wp.yaml"
        f.write_text(f"status:\n  listen: 127.0.0.1:{server.server_port}\n")
        now = time.time()
        reports.append({"synced": False})
        assert cli.main(["health", "--config", str(f)]) == 1
        assert "starting" in capsys.readouterr().err
        reports.append({"synced": True, "groups": [], "docker": {"state": "connected"},
                        "workers": [{"connected": True, "last_report": now}, {"connected": True, "last_report": now - 60}]})
        assert cli.main(["health", "--config", str(f)]) == 1
        assert "1 of 2 worker(s) serving" in capsys.readouterr().err
        reports.append({"synced": True, "groups": [{}], "docker": {"state": "connected"},
                        "workers": [{"connected": True, "last_report": now}]})
        assert cli.main(["health", "--config", str(f)]) == 0
        assert capsys.readouterr().out.startswith("ok: 1 group(s)")
    finally:
        server.shutdown()
    assert cli.main(["health", "--config", str(f)]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_docksal_variables_with_their_meaning(tmp_path):
    env = {"PROJECT_INACTIVITY_TIMEOUT": "0.5h", "PROJECT_AUTOSTART": "0"}
    cfg = parse_config("", "wp.yaml", env)
    assert cfg.idle.timeout == 1800 and cfg.wake.autostart is False
    assert parse_config("", "wp.yaml", {"PROJECT_INACTIVITY_TIMEOUT": "0"}).idle.timeout == 0  # off, as in Docksal
    # Ours for the same key wins.
    both = parse_config("", "wp.yaml", {"PROJECT_AUTOSTART": "0", "WAKEPROXY_WAKE_AUTOSTART": "1"})
    assert both.wake.autostart is True
    with pytest.raises(ConfigError) as exc:
        parse_config("", "wp.yaml", {"PROJECT_AUTOSTART": "sometimes"})
    assert str(exc.value).startswith("environment variable PROJECT_AUTOSTART: wake.autostart: expected true or false")


def test_docksal_default_cert_names_a_file_in_the_certificate_folder(tmp_path, monkeypatch):
    from wakeproxy import config as config_mod

    f = tmp_path / "wp.yaml"
    f.write_text(f"tls:\n  certs_dir: {tmp_path / 'certs'}\n")
    (tmp_path / "certs").mkdir()
    for ext in ("crt", "key"):
        (tmp_path / "certs" / f"example.com.{ext}").write_text("x")
    cfg = load_config(f, {"DEFAULT_CERT": "example.com"})
    assert cfg.tls.default_cert == tmp_path / "certs" / "example.com.crt"
    assert cfg.tls.default_key == tmp_path / "certs" / "example.com.key"
    # As in Docksal: a name without its files (its image's own `docksal`) keeps the generated default, and
    # says so once at start (preflight.notes), instead of refusing to start.
    from wakeproxy import preflight

    for name in ("docksal", "missing"):
        cfg = load_config(f, {"DEFAULT_CERT": name})
        assert cfg.tls.default_cert is None
        (note,) = preflight.notes(cfg, {"DEFAULT_CERT": name})
        assert f"DEFAULT_CERT={name}" in note and "generated default" in note
    assert preflight.notes(load_config(f, {"DEFAULT_CERT": "example.com"}), {"DEFAULT_CERT": "example.com"}) == []
    # A relative certs_dir is the config file's folder's, for DEFAULT_CERT too (wherever the proxy starts).
    f.write_text("tls:\n  certs_dir: certs\n")
    monkeypatch.chdir("/")
    assert load_config(f, {"DEFAULT_CERT": "example.com"}).tls.default_cert == tmp_path / "certs" / "example.com.crt"
    f.write_text(f"tls:\n  certs_dir: {tmp_path / 'certs'}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(f, {"DEFAULT_CERT": "../../etc/shadow"})
    assert "DEFAULT_CERT" in str(exc.value)
    # Docksal's folder, when it exists and no certs_dir is set.
    docksal = tmp_path / "etc-certs-custom"
    docksal.mkdir()
    monkeypatch.setattr(config_mod, "DOCKSAL_CERTS_DIR", docksal)
    f.write_text("")
    for ext in ("crt", "key"):
        (docksal / f"example.com.{ext}").write_text("x")
    cfg = load_config(f, {"DEFAULT_CERT": "example.com"})
    assert cfg.tls.certs_dir == docksal and cfg.tls.default_cert == docksal / "example.com.crt"
    assert load_config(f, {}).tls.default_cert is None
    # Docksal's folder: its io.docksal.cert-name labels are honoured, unless the variable says otherwise.
    assert load_config(f, {}).labels.cert_name is True
    assert load_config(f, {"WAKEPROXY_LABELS_CERT_NAME": "false"}).labels.cert_name is False
    f.write_text("labels:\n  cert_name: false\n")  # the operator's file says no: so be it
    assert load_config(f, {}).labels.cert_name is False
    f.write_text("")
    monkeypatch.setattr(config_mod, "DOCKSAL_CERTS_DIR", tmp_path / "absent")
    assert load_config(f, {}).labels.cert_name is False


def test_docksal_dangling_timeout_removes_only_docksal_projects(tmp_path):
    f = tmp_path / "wp.yaml"
    f.write_text("")
    cfg = load_config(f, {"PROJECT_DANGLING_TIMEOUT": "168h"})
    assert (cfg.idle.remove_after, cfg.idle.remove_label) == (168 * 3600, "io.docksal.project-root")
    # Our own key removes any group the proxy manages (the label filter only when asked for).
    assert load_config(f, {"WAKEPROXY_REMOVE_AFTER": "7d"}).idle.remove_label is None
    cfg = load_config(f, {"PROJECT_DANGLING_TIMEOUT": "168h", "WAKEPROXY_REMOVE_AFTER": "7d"})
    assert (cfg.idle.remove_after, cfg.idle.remove_label) == (7 * 86400, None)
    f.write_text("idle:\n  remove_label: my.team/retire\n")
    assert load_config(f, {"PROJECT_DANGLING_TIMEOUT": "1d"}).idle.remove_label == "my.team/retire"


def test_docksal_access_log_and_the_variables_without_a_counterpart(tmp_path):
    from wakeproxy import preflight

    f = tmp_path / "wp.yaml"
    f.write_text("")
    assert load_config(f, {"ACCESS_LOG": "1"}).log.access == "-"
    assert load_config(f, {"ACCESS_LOG": "0"}).log.access is None
    f.write_text("log:\n  access: /var/log/wakeproxy/access.log\n")  # ACCESS_LOG=0 leaves it alone
    assert str(load_config(f, {"ACCESS_LOG": "0"}).log.access) == "/var/log/wakeproxy/access.log"
    f.write_text("")
    with pytest.raises(ConfigError) as exc:
        load_config(f, {"ACCESS_LOG": "maybe"})
    assert "ACCESS_LOG" in str(exc.value)
    cfg = load_config(f, {"STATS_LOG": "1", "DEBUG_LOG": "0"})
    (note,) = preflight.notes(cfg, {"STATS_LOG": "1", "DEBUG_LOG": "0"})
    assert note.startswith("STATS_LOG: ")


def test_permanent_sleeps_key_and_variable():
    assert parse_config("").idle.permanent_sleeps is False
    assert parse_config("idle:\n  permanent_sleeps: true\n").idle.permanent_sleeps is True
    assert parse_config("", env={"WAKEPROXY_PERMANENT_SLEEPS": "1"}).idle.permanent_sleeps is True


@pytest.mark.parametrize("value", ["9" * 400, "\u0663s", "inf", "1e400"])
def test_a_duration_is_finite_and_in_ascii_digits(value):
    with pytest.raises(ValueError):
        parse_duration(value)


def test_the_swarm_keys():
    assert parse_config("").docker.swarm == "auto"
    assert parse_config("docker:\n  swarm: on\n").docker.swarm == "on"  # YAML's bare on is a boolean
    assert parse_config("docker:\n  swarm: false\n").docker.swarm == "off"
    assert parse_config("", "wp.yaml", {"WAKEPROXY_SWARM": "off"}).docker.swarm == "off"
    cfg = parse_config("docker:\n  swarm_resync: 30s\n  max_replicas: 3\n")
    assert cfg.docker.swarm_resync == 30 and cfg.docker.max_replicas == 3
    with pytest.raises(ConfigError, match=r"^<string>:2: docker.swarm: 'sometimes' is not one of auto, on, off"):
        parse_config("docker:\n  swarm: sometimes\n")
    with pytest.raises(ConfigError, match=r"docker.max_replicas"):
        parse_config("docker:\n  max_replicas: 0\n")


def test_proxyctl_speaks_for_docksal_habits(capsys, tmp_path, monkeypatch):
    from wakeproxy import cli

    assert cli.proxyctl(["cleanup"]) == 0
    assert "removes abandoned projects by itself" in capsys.readouterr().out
    assert cli.proxyctl(["stop"]) == 0 and cli.proxyctl(["start"]) == 0
    assert cli.proxyctl([]) == 2 and cli.proxyctl(["nginx"]) == 2
    assert "usage: proxyctl stats" in capsys.readouterr().err
    seen = []
    monkeypatch.setattr(cli, "_status", lambda config, url, as_json: seen.append((config, url, as_json)) or 0)
    monkeypatch.setenv("WAKEPROXY_CONFIG", str(tmp_path / "wp.yaml"))
    assert cli.proxyctl(["stats"]) == 0
    assert seen == [(str(tmp_path / "wp.yaml"), None, False)]
