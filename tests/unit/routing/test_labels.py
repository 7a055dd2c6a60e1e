"""wakeproxy.labels: container labels / env → routes, for every supported convention."""

from __future__ import annotations

import pytest
from wakeproxy.config import SourcesConfig
from wakeproxy.routing.labels import (
    ContainerInfo,
    ContainerSettings,
    Dependency,
    LabelError,
    Route,
    docksal_note,
    normalize_host,
    parse_depends_on,
    parse_hosts,
    routes_for,
    settings_for,
)

ALL = SourcesConfig()


def info(labels=None, env=None, exposed=(), name="web", state="running", **kw) -> ContainerInfo:
    return ContainerInfo(
        id=f"id-{name}", name=name, state=state, labels=labels or {}, env=env or {}, exposed_ports=tuple(exposed), **kw
    )


def routes(labels=None, env=None, exposed=(), sources=ALL) -> list[Route]:
    return routes_for(info(labels, env, exposed), sources)


def hosts_of(rs: list[Route]) -> list[str]:
    return [r.host for r in rs]


def label_error(labels=None, env=None, exposed=(), sources=ALL) -> str:
    with pytest.raises(LabelError) as exc:
        routes(labels, env, exposed, sources)
    return str(exc.value)


# --- no declaration ---------------------------------------------------------------------


def test_no_labels_no_routes():
    assert routes() == []
    assert routes({"com.docker.compose.project": "x", "maintainer": "me"}, {"PATH": "/bin"}) == []


# --- ours -------------------------------------------------------------------------------------


def test_ours_single_host_defaults():
    assert routes({"wakeproxy.host": "a.test"}) == [Route("a.test", 80, "http", None, "wakeproxy")]


def test_ours_host_list_with_spaces_and_case():
    rs = routes({"wakeproxy.host": " A.test, b.TEST ,c.test  d.test,,"})
    assert hosts_of(rs) == ["a.test", "b.test", "c.test", "d.test"]
    assert {r.source for r in rs} == {"wakeproxy"}


def test_ours_duplicate_host_in_one_list_once():
    assert hosts_of(routes({"wakeproxy.host": "a.test, A.test, a.test."})) == ["a.test"]


def test_ours_trailing_dot_and_port_stripped():
    assert hosts_of(routes({"wakeproxy.host": "a.test., b.test:8080"})) == ["a.test", "b.test"]


def test_ours_wildcard():
    rs = routes({"wakeproxy.host": "*.Example.com, example.com"})
    assert hosts_of(rs) == ["*.example.com", "example.com"]


def test_ours_underscores_and_single_label_are_hostnames():
    assert hosts_of(routes({"wakeproxy.host": "my_app.test, localhost"})) == ["my_app.test", "localhost"]


def test_ours_port_scheme_network():
    rs = routes(
        {"wakeproxy.host": "a.test", "wakeproxy.port": " 8443 ", "wakeproxy.scheme": "HTTPS", "wakeproxy.network": "proxy"},
        exposed=(3000,),
    )
    assert rs == [Route("a.test", 8443, "https", "proxy", "wakeproxy")]


@pytest.mark.parametrize("exposed, port", [((), 80), ((3000,), 3000), ((80, 443), 80), ((3000, 8080), 80)])
def test_ours_default_port_is_the_only_exposed_port_else_80(exposed, port):
    assert routes({"wakeproxy.host": "a.test"}, exposed=exposed)[0].port == port


def test_ours_empty_network_label_means_any():
    assert routes({"wakeproxy.host": "a.test", "wakeproxy.network": ""})[0].network is None


@pytest.mark.parametrize("value", ["false", "False", "0", "no", "off", " OFF "])
def test_wakeproxy_enable_false_disables_every_source(value):
    labels = {
        "wakeproxy.enable": value,
        "wakeproxy.host": "a.test",
        "io.docksal.virtual-host": "b.test",
        "traefik.http.routers.r.rule": "Host(`c.test`)",
    }
    assert routes(labels, env={"VIRTUAL_HOST": "d.test"}) == []


@pytest.mark.parametrize("value", ["true", "1", "yes", "on", "TRUE"])
def test_wakeproxy_enable_true_is_fine(value):
    assert hosts_of(routes({"wakeproxy.enable": value, "wakeproxy.host": "a.test"})) == ["a.test"]


def test_wakeproxy_enable_false_hides_even_malformed_labels():
    assert routes({"wakeproxy.enable": "false", "wakeproxy.host": "a..b", "wakeproxy.port": "x"}) == []


def test_wakeproxy_enable_garbage_names_the_label():
    msg = label_error({"wakeproxy.enable": "maybe", "wakeproxy.host": "a.test"})
    assert "wakeproxy.enable" in msg
    assert "'maybe'" in msg


# --- malformed (ours) -----------------------------------------------------------------


@pytest.mark.parametrize("host", ["a..b", "-x", "x-", "a.-b.test", "a_b$.test", "*", "a.*.test", "**.test", "[::1]", "é.test", "a/b"])
def test_bad_hostname(host):
    msg = label_error({"wakeproxy.host": f"ok.test, {host}"})
    assert "wakeproxy.host" in msg
    assert "not a hostname" in msg


@pytest.mark.parametrize("value", ["", "   ", ",", " , ,"])
def test_empty_host_list(value):
    msg = label_error({"wakeproxy.host": value})
    assert "wakeproxy.host" in msg and "no hostname" in msg


@pytest.mark.parametrize("port, fragment", [("http", "not a port"), ("", "not a port"), ("80.5", "not a port"),
                                            ("0", "out of range"), ("70000", "out of range"), ("65536", "out of range"),
                                            ("-1", "out of range")])
def test_bad_port(port, fragment):
    msg = label_error({"wakeproxy.host": "a.test", "wakeproxy.port": port})
    assert "wakeproxy.port" in msg and fragment in msg


def test_port_edges_accepted():
    assert routes({"wakeproxy.host": "a.test", "wakeproxy.port": "1"})[0].port == 1
    assert routes({"wakeproxy.host": "a.test", "wakeproxy.port": "65535"})[0].port == 65535


@pytest.mark.parametrize("scheme", ["ftp", "", "h2c", "http://"])
def test_bad_scheme(scheme):
    msg = label_error({"wakeproxy.host": "a.test", "wakeproxy.scheme": scheme})
    assert "wakeproxy.scheme" in msg


def test_parse_hosts_direct():
    assert parse_hosts("a.test b.test\tc.test\n", "x") == ["a.test", "b.test", "c.test"]
    assert parse_hosts("b.test, a.test, B.TEST., a.test:80", "x") == ["b.test", "a.test"]
    with pytest.raises(LabelError, match="^what: "):
        parse_hosts("a..b", "what")


# --- Docksal ----------------------------------------------------------------------------------


def test_docksal_host_and_port():
    rs = routes({"io.docksal.virtual-host": "Site.docksal, *.site.docksal", "io.docksal.virtual-port": "8080"})
    assert rs == [Route("site.docksal", 8080, "http", None, "docksal"), Route("*.site.docksal", 8080, "http", None, "docksal")]


def test_docksal_default_port_is_the_only_exposed_one_else_80():
    # Docksal's template: one exposed port is the upstream; else virtual-port, else 80 (ours: a label wins).
    assert routes({"io.docksal.virtual-host": "a.test"}, exposed=(3000,))[0].port == 3000
    assert routes({"io.docksal.virtual-host": "a.test"}, exposed=(3000, 4000))[0].port == 80
    assert routes({"io.docksal.virtual-host": "a.test", "io.docksal.virtual-port": "4000"},
                  exposed=(3000,))[0].port == 4000


def test_docksal_default_label_serves_its_names_without_the_trailing_wildcard():
    # Docksal's default: ${VIRTUAL_HOST},*.${VIRTUAL_HOST},${VIRTUAL_HOST}.*
    labels = {"io.docksal.virtual-host": "p1.docksal.site,*.p1.docksal.site,p1.docksal.site.*"}
    assert {r.host for r in routes(labels)} == {"p1.docksal.site", "*.p1.docksal.site"}
    note = docksal_note(labels)
    assert note is not None and "'p1.docksal.site.*'" in note and "not served" in note
    assert docksal_note({"io.docksal.virtual-host": "a.test"}) is None
    assert "only trailing wildcards" in label_error({"io.docksal.virtual-host": "a.*, b.*"})
    # A bounded note: three shown, the rest counted.
    many = {"io.docksal.virtual-host": "a.test " + " ".join(f"x{i}.*" for i in range(50))}
    assert (n := docksal_note(many)) is not None and "and 47 more" in n and len(n) < 400


def test_docksal_cert_name_none_is_unset():
    # Docksal's stacks write io.docksal.cert-name=${VIRTUAL_HOST_CERT_NAME:-none}
    assert settings_for(info({"io.docksal.cert-name": "none"})).cert_name is None
    assert settings_for(info({"io.docksal.cert-name": " None "})).cert_name is None
    assert settings_for(info({"io.docksal.cert-name": "example.com"})).cert_name == "example.com"


def test_docksal_bad_port_names_the_label():
    assert "io.docksal.virtual-port" in label_error({"io.docksal.virtual-host": "a.test", "io.docksal.virtual-port": "x"})


def test_docksal_bad_host_names_the_label():
    assert "io.docksal.virtual-host" in label_error({"io.docksal.virtual-host": "a..test"})


# --- nginx-proxy -----------------------------------------------------------------------------


def test_nginx_proxy_env():
    rs = routes(env={"VIRTUAL_HOST": "a.test,B.test", "VIRTUAL_PORT": "3000", "VIRTUAL_PROTO": "https"})
    assert rs == [Route("a.test", 3000, "https", None, "nginx-proxy"), Route("b.test", 3000, "https", None, "nginx-proxy")]


def test_nginx_proxy_labels_are_not_env():
    assert routes({"VIRTUAL_HOST": "a.test"}) == []


def test_nginx_proxy_default_port_follows_exposed_ports():
    assert routes(env={"VIRTUAL_HOST": "a.test"}, exposed=(5000,))[0].port == 5000
    assert routes(env={"VIRTUAL_HOST": "a.test"}, exposed=(5000, 5001))[0].port == 80


def test_nginx_proxy_empty_values_mean_unset():
    assert routes(env={"VIRTUAL_HOST": ""}) == []
    rs = routes(env={"VIRTUAL_HOST": "a.test", "VIRTUAL_PORT": "", "VIRTUAL_PROTO": ""})
    assert rs == [Route("a.test", 80, "http", None, "nginx-proxy")]


def test_nginx_proxy_wildcard_prefix_is_fine():
    assert hosts_of(routes(env={"VIRTUAL_HOST": "*.a.test"})) == ["*.a.test"]


@pytest.mark.parametrize("value", ["~^foo\\.example\\.com$", "a.test,~^x\\..*", "x.*", "a.test, x.*", "foo.example.*"])
def test_nginx_proxy_regex_and_trailing_wildcards_rejected(value):
    msg = label_error(env={"VIRTUAL_HOST": value})
    assert msg.startswith("env VIRTUAL_HOST: ")
    assert "regular expression" in msg  # says why, not just "not a hostname"


def test_nginx_proxy_bad_proto_and_port_name_the_variable():
    assert "VIRTUAL_PROTO" in label_error(env={"VIRTUAL_HOST": "a.test", "VIRTUAL_PROTO": "uwsgi"})
    assert "VIRTUAL_PORT" in label_error(env={"VIRTUAL_HOST": "a.test", "VIRTUAL_PORT": "0"})


# --- Traefik --------------------------------------------------------------------------------


def test_traefik_or_of_hosts_and_multi_arg_host():
    rs = routes({"traefik.http.routers.r.rule": "Host(`a.test`) || Host(`b.test`, `c.test`)"})
    assert hosts_of(rs) == ["a.test", "b.test", "c.test"]
    assert {(r.port, r.scheme, r.network, r.source) for r in rs} == {(80, "http", None, "traefik")}


def test_traefik_double_quotes_and_spaces():
    assert hosts_of(routes({"traefik.http.routers.r.rule": 'Host ( "X.test" )'})) == ["x.test"]


def test_traefik_host_without_quoted_name_is_an_error():
    assert "traefik.http.routers.r.rule" in label_error({"traefik.http.routers.r.rule": "Host(a.test)"})


def test_traefik_bad_host_names_the_router_rule():
    assert "traefik.http.routers.web.rule" in label_error({"traefik.http.routers.web.rule": "Host(`a..test`)"})


def test_traefik_port_from_the_single_service():
    labels = {
        "traefik.http.routers.r.rule": "Host(`a.test`)",
        "traefik.http.services.svc.loadbalancer.server.port": "8080",
        "traefik.http.services.svc.loadbalancer.server.scheme": "https",
    }
    assert routes(labels) == [Route("a.test", 8080, "https", None, "traefik")]


def test_traefik_port_from_the_routers_service():
    labels = {
        "traefik.http.routers.r.rule": "Host(`a.test`)",
        "traefik.http.routers.r.service": "two",
        "traefik.http.routers.s.rule": "Host(`b.test`)",
        "traefik.http.routers.s.service": "one",
        "traefik.http.services.one.loadbalancer.server.port": "1111",
        "traefik.http.services.two.loadbalancer.server.port": "2222",
    }
    by_host = {r.host: r.port for r in routes(labels)}
    assert by_host == {"a.test": 2222, "b.test": 1111}


def test_traefik_two_services_no_router_service_uses_default_port():
    labels = {
        "traefik.http.routers.r.rule": "Host(`a.test`)",
        "traefik.http.services.one.loadbalancer.server.port": "1111",
        "traefik.http.services.two.loadbalancer.server.port": "2222",
    }
    assert routes(labels, exposed=(9000,))[0].port == 9000


def test_traefik_default_port_without_service():
    assert routes({"traefik.http.routers.r.rule": "Host(`a.test`)"}, exposed=(4000,))[0].port == 4000


def test_traefik_bad_service_port_names_the_label():
    labels = {"traefik.http.routers.r.rule": "Host(`a.test`)", "traefik.http.services.s.loadbalancer.server.port": "x"}
    assert "traefik.http.services.s.loadbalancer.server.port" in label_error(labels)


def test_traefik_network():
    labels = {"traefik.http.routers.r.rule": "Host(`a.test`)", "traefik.docker.network": "web"}
    assert routes(labels)[0].network == "web"


def test_traefik_enable_false():
    assert routes({"traefik.enable": "false", "traefik.http.routers.r.rule": "Host(`a.test`)"}) == []


def test_traefik_enable_false_leaves_other_sources():
    labels = {"traefik.enable": "false", "traefik.http.routers.r.rule": "Host(`a.test`)", "wakeproxy.host": "b.test"}
    assert hosts_of(routes(labels)) == ["b.test"]


def test_traefik_enable_garbage_names_the_label():
    labels = {"traefik.enable": "sometimes", "traefik.http.routers.r.rule": "Host(`a.test`)"}
    assert "traefik.enable" in label_error(labels)


# --- precedence and switching sources off ----------------------------------------------------

EVERYTHING = {
    "labels": {
        "wakeproxy.host": "shared.test, ours.test",
        "wakeproxy.port": "1001",
        "io.docksal.virtual-host": "shared.test, docksal.test, both.test",
        "io.docksal.virtual-port": "1002",
        "traefik.http.routers.r.rule": "Host(`shared.test`, `traefik.test`, `both.test`, `np.test`)",
        "traefik.http.services.s.loadbalancer.server.port": "1004",
    },
    "env": {"VIRTUAL_HOST": "shared.test, np.test", "VIRTUAL_PORT": "1003"},
}


def by_host(sources=ALL) -> dict[str, tuple[int, str]]:
    rs = routes(EVERYTHING["labels"], EVERYTHING["env"], sources=sources)
    assert len(rs) == len({r.host for r in rs})  # every host once
    return {r.host: (r.port, r.source) for r in rs}


def test_first_source_wins_for_a_shared_host():
    assert by_host() == {
        "shared.test": (1001, "wakeproxy"),
        "ours.test": (1001, "wakeproxy"),
        "docksal.test": (1002, "docksal"),
        "both.test": (1002, "docksal"),
        "np.test": (1003, "nginx-proxy"),
        "traefik.test": (1004, "traefik"),
    }


def test_order_of_routes_follows_source_priority():
    rs = routes(EVERYTHING["labels"], EVERYTHING["env"])
    assert [r.source for r in rs] == ["wakeproxy", "wakeproxy", "docksal", "docksal", "nginx-proxy", "traefik"]


@pytest.mark.parametrize(
    "off, expected",
    [
        ("wakeproxy", {"shared.test": (1002, "docksal"), "docksal.test": (1002, "docksal"), "both.test": (1002, "docksal"),
                       "np.test": (1003, "nginx-proxy"), "traefik.test": (1004, "traefik")}),
        ("docksal", {"shared.test": (1001, "wakeproxy"), "ours.test": (1001, "wakeproxy"), "np.test": (1003, "nginx-proxy"),
                     "traefik.test": (1004, "traefik"), "both.test": (1004, "traefik")}),
        ("nginx_proxy", {"shared.test": (1001, "wakeproxy"), "ours.test": (1001, "wakeproxy"), "docksal.test": (1002, "docksal"),
                         "both.test": (1002, "docksal"), "traefik.test": (1004, "traefik"), "np.test": (1004, "traefik")}),
        ("traefik", {"shared.test": (1001, "wakeproxy"), "ours.test": (1001, "wakeproxy"), "docksal.test": (1002, "docksal"),
                     "both.test": (1002, "docksal"), "np.test": (1003, "nginx-proxy")}),
    ],
)
def test_each_source_can_be_switched_off(off, expected):
    assert by_host(SourcesConfig(**{off: False})) == expected


def test_all_sources_off():
    assert by_host(SourcesConfig(False, False, False, False)) == {}


@pytest.mark.parametrize(
    "off, labels, env",
    [
        ("wakeproxy", {"wakeproxy.host": "a..b"}, {}),
        ("docksal", {"io.docksal.virtual-host": "a..b"}, {}),
        ("nginx_proxy", {}, {"VIRTUAL_HOST": "~regex"}),
        ("traefik", {"traefik.http.routers.r.rule": "Host(`a..b`)"}, {}),
    ],
)
def test_a_switched_off_source_is_not_even_parsed(off, labels, env):
    with pytest.raises(LabelError):
        routes(labels, env)
    assert routes(labels, env, sources=SourcesConfig(**{off: False})) == []


def test_a_malformed_lower_priority_source_still_fails_the_container():
    # The container is skipped as a whole, rather than half-routed.
    with pytest.raises(LabelError, match="io.docksal.virtual-port"):
        routes({"wakeproxy.host": "a.test", "io.docksal.virtual-host": "b.test", "io.docksal.virtual-port": "x"})


# --- ContainerInfo ---------------------------------------------------------------------------


def test_group_from_own_labels():
    # A wakeproxy.group label splits a Compose project; it never joins another project.
    assert info({"wakeproxy.group": "g", "com.docker.compose.project": "p"}, name="n").group == "p/g"
    assert info({"wakeproxy.group": "p", "com.docker.compose.project": "p"}, name="n").group == "p"
    assert info({"com.docker.compose.project": "p"}, name="n").group == "p"
    assert info({"wakeproxy.group": "g"}, name="n").group == "g"
    assert info({}, name="n").group == "n"
    assert info({"wakeproxy.group": "", "com.docker.compose.project": "p"}, name="n").group == "p"


@pytest.mark.parametrize("label", ["wakeproxy.group", "com.docker.compose.project"])
@pytest.mark.parametrize("value", ["a\nb", "a/b", "-x", "x" * 64, "a b", "ä"])
def test_group_labels_must_be_plain_names(label, value):
    with pytest.raises(LabelError, match=label):
        settings_for(info({label: value}))


@pytest.mark.parametrize("state, running", [("running", True), ("exited", False), ("paused", False), ("restarting", False), ("created", False)])
def test_running(state, running):
    assert info(state=state).running is running


# --- normalize_host ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("A.Test", "a.test"),
        ("a.test.", "a.test"),
        ("a.test:8080", "a.test"),
        ("A.TEST.:443", "a.test"),
        ("  a.test  ", "a.test"),
        ("[::1]", "[::1]"),
        ("[::1]:8443", "[::1]"),
        ("[FE80::1]:80", "[fe80::1]"),
        ("127.0.0.1:80", "127.0.0.1"),
        ("", ""),
    ],
)
def test_normalize_host(raw, norm):
    assert normalize_host(raw) == norm


# --- wake settings (settings_for, parse_depends_on) --------------------------------------------


def test_settings_defaults():
    assert settings_for(info()) == ContainerSettings()


def test_settings_from_labels():
    s = settings_for(info({
        "wakeproxy.wake-strategy": " Page ",
        "wakeproxy.wake-timeout": "2m",
        "wakeproxy.ready-path": " /healthz?full=1 ",
        "com.docker.compose.service": "web",
        "com.docker.compose.depends_on": "db:service_healthy:false, migrate:service_completed_successfully,cache:",
    }))
    assert s == ContainerSettings(
        wake_strategy="page", wake_timeout=120.0, ready_path="/healthz?full=1", service="web",
        depends_on=(Dependency("db", "service_healthy"), Dependency("migrate", "service_completed_successfully"),
                    Dependency("cache", "service_started")),
    )


def test_depends_on_default_condition_and_empty_items():
    assert parse_depends_on("db, ,redis:service_started", "x") == (Dependency("db", "service_started"),
                                                                  Dependency("redis", "service_started"))
    assert parse_depends_on("", "x") == ()


@pytest.mark.parametrize(
    "labels, named",
    [
        ({"wakeproxy.wake-strategy": "lazy"}, "wakeproxy.wake-strategy"),
        ({"wakeproxy.wake-timeout": "soon"}, "wakeproxy.wake-timeout"),
        ({"wakeproxy.wake-timeout": "0"}, "wakeproxy.wake-timeout"),
        ({"wakeproxy.wake-timeout": "-1s"}, "wakeproxy.wake-timeout"),
        ({"wakeproxy.ready-path": "healthz"}, "wakeproxy.ready-path"),
        ({"wakeproxy.ready-path": "/a b"}, "wakeproxy.ready-path"),
        ({"com.docker.compose.depends_on": "db:service_ready"}, "com.docker.compose.depends_on"),
        ({"com.docker.compose.depends_on": ":service_started"}, "com.docker.compose.depends_on"),
    ],
)
def test_settings_errors_name_the_label(labels, named):
    with pytest.raises(LabelError) as exc:
        settings_for(info(labels))
    assert str(exc.value).startswith(f"label {named}: ")


def test_idle_settings():
    s = settings_for(info({"wakeproxy.idle-timeout": " 45m ", "wakeproxy.idle-action": " PAUSE "}))
    assert (s.idle_timeout, s.idle_action) == (2700.0, "pause")
    assert settings_for(info({"wakeproxy.idle-timeout": "0"})).idle_timeout == 0.0
    # io.docksal.permanent is its own setting: the snapshot decides what it means (idle.permanent_sleeps).
    s = settings_for(info({"io.docksal.permanent": "true", "wakeproxy.idle-timeout": "1h"}))
    assert (s.permanent, s.idle_timeout) == (True, 3600.0)
    s = settings_for(info({"io.docksal.permanent": "false", "wakeproxy.idle-timeout": "1h"}))
    assert (s.permanent, s.idle_timeout) == (False, 3600.0)
    assert settings_for(info({"io.docksal.permanent": "false"})).idle_timeout is None


@pytest.mark.parametrize(
    "labels, named",
    [
        ({"wakeproxy.idle-timeout": "a while"}, "wakeproxy.idle-timeout"),
        ({"wakeproxy.idle-timeout": "-5m"}, "wakeproxy.idle-timeout"),
        ({"wakeproxy.idle-action": "kill"}, "wakeproxy.idle-action"),
        ({"io.docksal.permanent": "forever"}, "io.docksal.permanent"),
    ],
)
def test_idle_settings_errors_name_the_label(labels, named):
    with pytest.raises(LabelError) as exc:
        settings_for(info(labels))
    assert str(exc.value).startswith(f"label {named}: ")


# --- limits (check_limits, MAX_*) ---------------------------------------------------------------

from wakeproxy.routing.labels import MAX_HOSTS, MAX_KEY_BYTES, MAX_ROUTERS, MAX_VALUE_BYTES, check_limits  # noqa: E402

BIG = "x" * (MAX_VALUE_BYTES + 1)


@pytest.mark.parametrize(
    "key",
    [
        "wakeproxy.host", "wakeproxy.port", "wakeproxy.group", "wakeproxy.cert-name", "wakeproxy.something-new",
        "io.docksal.virtual-host", "io.docksal.virtual-port", "io.docksal.cert-name", "io.docksal.permanent",
        "traefik.enable", "traefik.docker.network", "traefik.http.routers.r.rule", "traefik.http.routers.r.service",
        "traefik.http.services.s.loadbalancer.server.port", "com.docker.compose.project",
        "com.docker.compose.service", "com.docker.compose.depends_on",
    ],
)
def test_an_oversized_label_we_read_skips_the_container_naming_label_and_size(key):
    msg = label_error({key: BIG, "wakeproxy.host": "a.test"} if key != "wakeproxy.host" else {key: BIG})
    assert msg == f"label {key}: the value is {MAX_VALUE_BYTES + 1} bytes, more than the {MAX_VALUE_BYTES} allowed"


def test_the_size_limit_counts_utf8_bytes_and_allows_exactly_the_limit():
    at_limit = "é" * (MAX_VALUE_BYTES // 2)  # 2 bytes each
    assert routes({"wakeproxy.host": "a.test", "wakeproxy.group": at_limit}) != []
    assert "4098 bytes" in label_error({"wakeproxy.host": "a.test", "wakeproxy.group": at_limit + "é"})


@pytest.mark.parametrize(
    "key", ["traefik.http.middlewares.auth.basicauth.users", "com.docker.compose.project.config_files",
            "io.docksal.project-root", "maintainer", "traefik.http.routers.r.middlewares",
            "traefik.http.services.s.loadbalancer.healthcheck.path"],
)
def test_an_oversized_label_we_do_not_read_is_fine(key):
    assert hosts_of(routes({"wakeproxy.host": "a.test", key: BIG})) == ["a.test"]


def test_oversized_labels_of_a_switched_off_source_are_not_read():
    labels = {"wakeproxy.host": "a.test", "traefik.http.routers.r.rule": BIG, "io.docksal.virtual-host": BIG}
    assert hosts_of(routes(labels, sources=SourcesConfig(docksal=False, traefik=False))) == ["a.test"]
    assert hosts_of(routes(env={"VIRTUAL_HOST": BIG}, labels={"wakeproxy.host": "a.test"},
                           sources=SourcesConfig(nginx_proxy=False))) == ["a.test"]


@pytest.mark.parametrize("name", ["VIRTUAL_HOST", "VIRTUAL_PORT", "VIRTUAL_PROTO", "LETSENCRYPT_HOST"])
def test_an_oversized_env_value_skips_the_container(name):
    msg = label_error({"wakeproxy.host": "a.test"}, {name: BIG})
    assert msg.startswith(f"env {name}: the value is {MAX_VALUE_BYTES + 1} bytes")


def test_settings_for_checks_the_size_of_its_labels():
    with pytest.raises(LabelError, match=r"^label com.docker.compose.depends_on: the value is \d+ bytes"):
        settings_for(info({"com.docker.compose.depends_on": "db," * 2000}))
    with pytest.raises(LabelError, match=r"^label wakeproxy.wake-timeout: the value is"):
        settings_for(info({"wakeproxy.wake-timeout": "1" + " " * MAX_VALUE_BYTES + "s"}))


def test_an_oversized_label_name_is_rejected_without_echoing_it():
    key = "traefik.http.routers." + "r" * MAX_KEY_BYTES + ".rule"
    msg = label_error({key: "Host(`a.test`)"})
    assert "the label name is" in msg and len(msg) < 200


def test_an_oversized_service_name_is_rejected_from_any_of_its_labels():
    key = "traefik.http.services." + "s" * MAX_KEY_BYTES + ".loadbalancer.healthcheck.path"
    assert "the label name is" in label_error({"traefik.http.routers.r.rule": "Host(`a.test`)", key: "/"})


def test_router_limit():
    ok = {f"traefik.http.routers.r{i}.rule": f"Host(`r{i}.test`)" for i in range(MAX_ROUTERS)}
    assert len(routes(ok)) == MAX_ROUTERS
    too_many = {**ok, "traefik.http.routers.last.rule": "Host(`last.test`)"}
    assert label_error(too_many) == (f"labels traefik.http.routers.*.rule: {MAX_ROUTERS + 1} routers, "
                                     f"more than the {MAX_ROUTERS} allowed")


def test_host_limit_per_value_and_per_container():
    names = [f"h{i}.test" for i in range(MAX_HOSTS + 1)]
    assert len(routes({"wakeproxy.host": ",".join(names[:MAX_HOSTS])})) == MAX_HOSTS
    assert len(routes({"wakeproxy.host": ",".join(names[:MAX_HOSTS] + names[:5])})) == MAX_HOSTS  # repeats count once
    assert label_error({"wakeproxy.host": ",".join(names)}) == f"label wakeproxy.host: more than {MAX_HOSTS} hosts"
    rule = " || ".join(f"Host(`{n}`)" for n in names)
    assert label_error({"traefik.http.routers.r.rule": rule}).startswith("label traefik.http.routers.r.rule: more than")
    split = {"wakeproxy.host": ",".join(names[:60]), "io.docksal.virtual-host": ",".join(names[60:])}
    assert label_error(split) == f"label io.docksal.virtual-host: brings the container to more than {MAX_HOSTS} hosts"


def test_check_limits_direct():
    check_limits(info({"wakeproxy.host": "a.test"}, {"LETSENCRYPT_HOST": "a.test"}), ALL)
    with pytest.raises(LabelError):
        check_limits(info(env={"LETSENCRYPT_HOST": BIG}), None)  # acme reads it whatever the sources


def test_long_invalid_values_are_cut_in_messages():
    msg = label_error({"wakeproxy.host": "a.test", "wakeproxy.port": "9" * 3000})
    assert len(msg) < 200 and "…" in msg
    msg = label_error({"wakeproxy.host": "-" * 3000})
    assert len(msg) < 200


# --- Traefik rule syntax, through the labels ---------------------------------------------------


@pytest.mark.parametrize(
    "rule, where",
    [
        ("Host(`a.test`", "at character 5"),  # the "(" without ")"
        ("Host(`a.test)", "at character 6"),  # the unterminated quote
        ('Host("a.test)', "at character 6"),
        ("(Host(`a.test`)", "at character 1"),
        ("Host(`a.test`))", "at character 15"),
        ("Host(`a.test`) Path(`/x`)", "at character 16"),
        ("Host(`a.test`) &", "at character 16"),
        ("Host()", "at character 6"),
        ("Host(a.test)", "at character 6"),
        ("", "at character 1"),
    ],
)
def test_traefik_syntax_errors_name_router_and_position(rule, where):
    msg = label_error({"traefik.http.routers.web.rule": rule})
    assert msg.startswith("label traefik.http.routers.web.rule: ")
    assert msg.endswith(where)
    assert "a.test" not in msg  # the position, not the value


def test_traefik_syntax_of_other_matchers_is_checked_too():
    assert "character 23" in label_error({"traefik.http.routers.r.rule": "Host(`a.test`) && Path(`/x`"})
    assert "character 30" in label_error({"traefik.http.routers.r.rule": "Host(`a.test`) && PathPrefix(/x)"})


def test_traefik_host_argument_is_one_hostname():
    msg = label_error({"traefik.http.routers.r.rule": "Host(`a.test b.test`)"})
    assert msg.startswith("label traefik.http.routers.r.rule: Host at character 1: ")


def test_traefik_too_deep_is_an_error():
    rule = "(" * 40 + "Host(`a.test`)" + ")" * 40
    assert "nested more than" in label_error({"traefik.http.routers.r.rule": rule})
    assert hosts_of(routes({"traefik.http.routers.r.rule": "((((Host(`a.test`))))) && ((PathPrefix(`/`)))"})) == ["a.test"]


def test_the_150kb_host_label_is_rejected_fast():
    import time

    labels = {"traefik.http.routers.r.rule": "Host(" * 30_000}
    start = time.perf_counter()
    msg = label_error(labels)
    assert time.perf_counter() - start < 0.05
    assert msg == f"label traefik.http.routers.r.rule: the value is 150000 bytes, more than the {MAX_VALUE_BYTES} allowed"


def test_nginx_proxy_trailing_wildcard_check_is_linear():
    import time

    raw = "," + " " * (MAX_VALUE_BYTES - 2) + "x"  # the old regex backtracked over the spaces
    start = time.perf_counter()
    assert routes(env={"VIRTUAL_HOST": raw}) == [Route("x", 80, "http", None, "nginx-proxy")]
    assert time.perf_counter() - start < 0.05


def test_parse_hosts_is_bounded_on_its_own():
    # settings_for calls it on LETSENCRYPT_HOST, which routes_for never sees.
    with pytest.raises(LabelError, match=r"^env LETSENCRYPT_HOST: the value is \d+ bytes"):
        parse_hosts("a.test " * 1000, "env LETSENCRYPT_HOST")
    with pytest.raises(LabelError, match=f"more than {MAX_HOSTS} hosts"):
        parse_hosts(" ".join(f"h{i}.t" for i in range(MAX_HOSTS + 1)), "x")


# --- paths: which requests of a host a route takes ----------------------------------------------

from wakeproxy.routing.labels import MAX_ROUTES, USED_ENV, path_matches, traefik_routes  # noqa: E402


def paths_of(rs: list[Route]) -> list[tuple[str, str, bool]]:
    return [(r.host, r.path, r.exact) for r in rs]


@pytest.mark.parametrize(
    "prefix, exact, path, matches",
    [
        ("/", False, "/", True), ("/", False, "/anything/at/all", True),
        ("/api", False, "/api", True), ("/api", False, "/api/", True), ("/api", False, "/api/v1/x", True),
        ("/api", False, "/apix", False), ("/api", False, "/ap", False), ("/api", False, "/", False),
        ("/api", False, "/API", False),  # paths are case-sensitive
        ("/api/", False, "/api/", True), ("/api/", False, "/api/x", True), ("/api/", False, "/api", False),
        ("/api", True, "/api", True), ("/api", True, "/api/", False), ("/api", True, "/api/x", False),
        ("/a.b", False, "/a.b/c", True), ("/a%20b", False, "/a b", False),  # compared as sent
    ],
)
def test_path_matches_whole_segments(prefix, exact, path, matches):
    assert path_matches(prefix, exact, path) is matches


def test_routes_default_to_every_path():
    assert routes({"wakeproxy.host": "a.test"})[0].path == "/"
    assert routes({"wakeproxy.host": "a.test"})[0].exact is False


def test_wakeproxy_path_applies_to_every_host_of_the_label():
    rs = routes({"wakeproxy.host": "a.test, b.test", "wakeproxy.path": "/api, /v2/ /api"})
    assert paths_of(rs) == [("a.test", "/api", False), ("a.test", "/v2/", False),
                            ("b.test", "/api", False), ("b.test", "/v2/", False)]
    assert {r.source for r in rs} == {"wakeproxy"}


@pytest.mark.parametrize(
    "value, fragment",
    [("api", "is not a path"), ("/a?b", "is not a path"), ("/a#b", "is not a path"), ("/é", "is not a path"),
     ("/{id:[0-9]+}", "path template"), ("", "no path given"), (" , ", "no path given")],
)
def test_bad_wakeproxy_path(value, fragment):
    msg = label_error({"wakeproxy.host": "a.test", "wakeproxy.path": value})
    assert msg.startswith("label wakeproxy.path: ") and fragment in msg


def test_wakeproxy_path_without_host_is_an_error():
    assert label_error({"wakeproxy.path": "/api"}).startswith("label wakeproxy.path: it applies to the hosts")


def test_virtual_path():
    assert "VIRTUAL_PATH" in USED_ENV and "VIRTUAL_DEST" in USED_ENV
    rs = routes(env={"VIRTUAL_HOST": "a.test,b.test", "VIRTUAL_PATH": " /api "})
    assert paths_of(rs) == [("a.test", "/api", False), ("b.test", "/api", False)]
    assert routes(env={"VIRTUAL_HOST": "a.test", "VIRTUAL_PATH": ""})[0].path == "/"


@pytest.mark.parametrize(
    "env, start, fragment",
    [
        ({"VIRTUAL_PATH": "~^/api"}, "env VIRTUAL_PATH: ", "regular expression"),
        ({"VIRTUAL_PATH": "api"}, "env VIRTUAL_PATH: ", "is not a path"),
        ({"VIRTUAL_PATH": "/api", "VIRTUAL_DEST": "/"}, "env VIRTUAL_DEST: ", "rewriting the request path"),
    ],
)
def test_virtual_path_refusals(env, start, fragment):
    msg = label_error(env={"VIRTUAL_HOST": "a.test", **env})
    assert msg.startswith(start) and fragment in msg


def test_the_same_host_and_path_keeps_the_first_source_other_paths_add_up():
    rs = routes({"wakeproxy.host": "a.test", "wakeproxy.port": "1001",
                 "traefik.http.routers.r.rule": "Host(`a.test`) || Host(`a.test`) && PathPrefix(`/api`)"})
    assert [(r.path, r.port, r.source) for r in rs] == [("/", 1001, "wakeproxy"), ("/api", 80, "traefik")]


def test_route_limit_counts_host_and_path_pairs():
    hosts = ",".join(f"h{i}.test" for i in range(100))
    assert len(routes({"wakeproxy.host": hosts, "wakeproxy.path": "/a,/b"})) == 200
    msg = label_error({"wakeproxy.host": hosts, "wakeproxy.path": "/a,/b,/c"})
    assert msg == f"label wakeproxy.host: brings the container to more than {MAX_ROUTES} routes (host × path)"


# --- Traefik rules → routes: every form that is routed ------------------------------------------


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("Host(`a.test`)", [("a.test", "/", False)]),
        ("Host(`a.test`) && PathPrefix(`/api`)", [("a.test", "/api", False)]),
        ("PathPrefix(`/api`) && Host(`A.test`)", [("a.test", "/api", False)]),
        ("Host(`a.test`) && Path(`/health`)", [("a.test", "/health", True)]),
        ("Host(`a.test`) && PathPrefix(`/`)", [("a.test", "/", False)]),
        ("Host(`a.test`) && PathPrefix(`/api/`)", [("a.test", "/api/", False)]),
        ("Host(`a.test`) || Host(`b.test`)", [("a.test", "/", False), ("b.test", "/", False)]),
        ("Host(`a.test`, `b.test`)", [("a.test", "/", False), ("b.test", "/", False)]),
        ("Host(`a.test`) && (PathPrefix(`/x`) || PathPrefix(`/y`))", [("a.test", "/x", False), ("a.test", "/y", False)]),
        ("Host(`a.test`) && PathPrefix(`/x`, `/y`)", [("a.test", "/x", False), ("a.test", "/y", False)]),
        ("Host(`a.test`, `b.test`) && PathPrefix(`/x`)", [("a.test", "/x", False), ("b.test", "/x", False)]),
        ("(Host(`a.test`) || Host(`b.test`)) && (Path(`/x`) || PathPrefix(`/y`))",
         [("a.test", "/x", True), ("a.test", "/y", False), ("b.test", "/x", True), ("b.test", "/y", False)]),
        ("(Host(`a.test`) && PathPrefix(`/api`)) || Host(`b.test`)", [("a.test", "/api", False), ("b.test", "/", False)]),
        ("Host(`a.test`) && PathPrefix(`/x`) || Host(`a.test`) && Path(`/x`)", [("a.test", "/x", False),
                                                                               ("a.test", "/x", True)]),
        ("Host(`a.test`) && Host(`A.TEST`) && PathPrefix(`/x`) && PathPrefix(`/x`)", [("a.test", "/x", False)]),
        ("host(`a.test`) && pathprefix(`/x`) || Host(`b.test`) && path(`/y`)",  # Traefik v2 takes lower case
         [("a.test", "/x", False), ("b.test", "/y", True)]),
        ("((((Host(`a.test`)))) && ((Path(`/q`))))", [("a.test", "/q", True)]),
    ],
)
def test_traefik_routed_forms(rule, expected):
    rs = routes({"traefik.http.routers.r.rule": rule})
    assert paths_of(rs) == expected
    assert [tuple(r) for r in traefik_routes(rule, "x")] == expected


def test_traefik_two_routers_of_one_host_split_its_paths():
    labels = {"traefik.http.routers.a.rule": "Host(`x.test`)", "traefik.http.routers.b.rule": "Host(`x.test`) && Path(`/b`)",
              "traefik.http.routers.a.service": "a", "traefik.http.services.a.loadbalancer.server.port": "8000",
              "traefik.http.routers.b.service": "b", "traefik.http.services.b.loadbalancer.server.port": "9000"}
    assert [(r.path, r.exact, r.port) for r in routes(labels)] == [("/", False, 8000), ("/b", True, 9000)]


# --- Traefik rules → routes: every form that is refused (never a partial route) ------------------


@pytest.mark.parametrize(
    "rule, fragment",
    [
        ("HostRegexp(`^a\\.test$`)", "HostRegexp(…) at character 1 is not supported"),
        ("Host(`a.test`) && HostRegexp(`x`) || Host(`b.test`)", "HostRegexp(…) at character 19 is not supported"),
        ("Host(`a.test`) && Headers(`X`, `1`)", "Headers(…) at character 19 is not supported"),
        ("Host(`a.test`) && Header(`X`, `1`)", "Header(…) at character 19"),
        ("Host(`a.test`) && HeaderRegexp(`X`, `.*`)", "HeaderRegexp(…) at character 19"),
        ("Host(`a.test`) && Method(`GET`)", "Method(…) at character 19"),
        ("Host(`a.test`) && Query(`a`, `1`)", "Query(…) at character 19"),
        ("Host(`a.test`) && ClientIP(`10.0.0.0/8`)", "ClientIP(…) at character 19"),
        ("Host(`a.test`) && PathRegexp(`^/a`)", "PathRegexp(…) at character 19"),
        ("HostSNI(`*`)", "HostSNI(…) at character 1"),
        ("Hots(`a.test`)", "Hots(…) at character 1"),  # a typo is not a Host
        ("HOST(`a.test`)", "HOST(…) at character 1"),
        ("Host(`a.test`) && !PathPrefix(`/admin`)", "'!' at character 19 is not supported"),
        ("!Host(`a.test`)", "'!' at character 1"),
        ("Host(`a.test`) && !Method(`POST`) && Header(`X`, `1`)",
         "'!' at character 19, Header(…) at character 38 are not supported"),
        ("PathPrefix(`/api`)", "PathPrefix(…) at character 1 has no Host(…) with it"),
        ("Host(`a.test`) || PathPrefix(`/api`)", "PathPrefix(…) at character 19 has no Host(…)"),
        ("(Host(`a.test`) || Path(`/x`)) && PathPrefix(`/y`)", "Path(…) at character 20 has no Host(…)"),
        ("Host(`a.test`) && Host(`b.test`)", "Host at character 19: two different hosts joined by &&"),
        ("Host(`a.test`) && PathPrefix(`/x`) && Path(`/y`)", "Path at character 39: two path matchers joined by &&"),
        ("Host(`a.test`) && PathPrefix(`api`)", "PathPrefix at character 19: 'api' is not a path"),
        ("Host(`a.test`) && Path(`/a b`)", "Path at character 19: '/a b' is not a path"),
        ("Host(`a.test`) && Path(`/p/{id:[0-9]+}`)", "is a path template"),
        ("Host(`a..test`) && Path(`/p`)", "Host at character 1: 'a..test' is not a hostname"),
        ("Host(`*.a.test`)", "Host at character 1: '*.a.test' is a wildcard, which Traefik's Host does not match"),
    ],
)
def test_traefik_refused_forms_name_the_router_and_the_part(rule, fragment):
    msg = label_error({"traefik.http.routers.api.rule": rule, "wakeproxy.host": "ok.test"})
    assert msg.startswith("label traefik.http.routers.api.rule: "), msg
    assert fragment in msg, msg


def test_traefik_alternatives_are_bounded():
    paths = " || ".join(f"PathPrefix(`/{i}`)" for i in range(20))
    hosts = " || ".join(f"Host(`h{i}.test`)" for i in range(12))
    assert len(routes({"traefik.http.routers.r.rule": f"({hosts}) && ({paths})"})) == 240
    hosts = " || ".join(f"Host(`h{i}.test`)" for i in range(13))
    msg = label_error({"traefik.http.routers.r.rule": f"({hosts}) && ({paths})"})
    assert msg == f"label traefik.http.routers.r.rule: the rule has more than {MAX_ROUTES} alternatives (host × path)"
    doubling = " && ".join(["(Host(`a.test`) || Host(`a.test`))"] * 60)  # 2**60 if multiplied out
    assert "more than" in label_error({"traefik.http.routers.r.rule": doubling})


def test_traefik_router_priority_is_refused():
    msg = label_error({"traefik.http.routers.r.rule": "Host(`a.test`)", "traefik.http.routers.r.priority": "10"})
    assert msg.startswith("label traefik.http.routers.r.priority: router priorities are not supported")


# --- every bad label is reported, with the hosts that could be read ------------------------------


def test_every_bad_label_of_a_container_is_named_once():
    with pytest.raises(LabelError) as exc:
        routes({"wakeproxy.host": "a.test", "wakeproxy.port": "x", "wakeproxy.scheme": "ftp",
                "traefik.http.routers.web.rule": "Host(`b.test`) && Method(`GET`)",
                "traefik.http.routers.old.rule": "Host(`c.test`",
                "io.docksal.virtual-host": "d.test"}, env={"VIRTUAL_HOST": "e.test", "VIRTUAL_PORT": "0"})
    e = exc.value
    assert [m.split(":")[0] for m in e.errors] == [
        "label wakeproxy.port", "label wakeproxy.scheme", "env VIRTUAL_PORT",
        "label traefik.http.routers.old.rule", "label traefik.http.routers.web.rule"]
    assert str(e) == "; ".join(e.errors)
    assert e.hosts == ("a.test", "d.test", "e.test", "c.test", "b.test")


def test_hosts_of_a_bad_declaration_are_left_out():
    with pytest.raises(LabelError) as exc:
        routes({"wakeproxy.host": "a..test", "traefik.http.routers.r.rule": "Host(`-x`"})
    assert exc.value.hosts == ()


def test_settings_errors_are_all_reported():
    with pytest.raises(LabelError) as exc:
        settings_for(info({"wakeproxy.wake-strategy": "lazy", "wakeproxy.idle-action": "kill",
                           "wakeproxy.idle-timeout": "soon", "wakeproxy.ready-path": "x"}))
    assert [m.split(":")[0] for m in exc.value.errors] == [
        "label wakeproxy.wake-strategy", "label wakeproxy.ready-path", "label wakeproxy.idle-timeout",
        "label wakeproxy.idle-action"]


def test_every_oversized_value_is_named():
    with pytest.raises(LabelError) as exc:
        routes({"wakeproxy.host": BIG, "wakeproxy.port": BIG}, env={"VIRTUAL_HOST": BIG})
    assert [m.split(":")[0] for m in exc.value.errors] == ["label wakeproxy.host", "label wakeproxy.port",
                                                          "env VIRTUAL_HOST"]


def test_the_number_of_errors_named_is_bounded():
    from wakeproxy.routing.labels import MAX_ERRORS

    labels = {f"traefik.http.routers.r{i}.rule": f"Host(`r{i}.test`) && Method(`GET`)" for i in range(20)}
    with pytest.raises(LabelError) as exc:
        routes(labels)
    assert len(exc.value.errors) == MAX_ERRORS + 1
    assert exc.value.errors[-1] == f"and {20 - MAX_ERRORS} more errors"
    assert len(exc.value.hosts) == 20


def test_docksal_host_label_of_commas_only_says_no_hostname():
    assert "no hostname given" in label_error({"io.docksal.virtual-host": ",,,"})
