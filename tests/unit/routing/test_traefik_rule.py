"""wakeproxy.traefik_rule: Traefik rule syntax → syntax tree (the routing meaning is tested in test_labels)."""

from __future__ import annotations

import pytest
from wakeproxy.routing.traefik_rule import MAX_DEPTH, And, Matcher, Not, Or, RuleError, host_arguments, parse_rule


def test_single_matcher_with_several_arguments_and_both_quotes():
    assert parse_rule('Host(`a.test`, "b.test")') == Matcher("Host", ("a.test", "b.test"), 0)


def test_precedence_and_binds_tighter_than_or():
    tree = parse_rule("Host(`a`) || Host(`b`) && PathPrefix(`/b`)")
    assert tree == Or((Matcher("Host", ("a",), 0),
                       And((Matcher("Host", ("b",), 13), Matcher("PathPrefix", ("/b",), 26)))))


def test_parentheses_and_not():
    tree = parse_rule("!(Host(`a`) || Method(`GET`)) && Path(`/`)")
    assert tree == And((Not(Or((Matcher("Host", ("a",), 2), Matcher("Method", ("GET",), 15))), 0),
                        Matcher("Path", ("/",), 33)))


def test_chains_are_flat():
    tree = parse_rule(" || ".join(["Host(`a`)"] * 50))
    assert isinstance(tree, Or) and len(tree.operands) == 50


def test_whitespace_anywhere():
    assert parse_rule(" \tHost ( `a` ,\n`b` ) ") == Matcher("Host", ("a", "b"), 2)


def test_quoted_arguments_keep_anything_but_their_quote():
    assert parse_rule("HostRegexp(`^(a|b)\\.test$`)").args == ("^(a|b)\\.test$",)
    assert parse_rule('Header("X", "a\\"b\\\\c\\d")').args == ("X", 'a"b\\c\\d')
    assert parse_rule("Path(`\"`)").args == ('"',)


@pytest.mark.parametrize(
    "rule, pos, reason",
    [
        ("", 0, "empty rule"),
        ("   ", 0, "empty rule"),
        ("Host(`a`", 4, "unbalanced '('"),
        ("(Host(`a`)", 0, "unbalanced '('"),
        ("Host(`a`))", 9, "unbalanced ')'"),
        ("Host(`a", 5, "unterminated `-quoted"),
        ('Host("a\\"', 5, 'unterminated "-quoted'),
        ('Host("a\\', 5, 'unterminated "-quoted'),
        ("Host()", 5, "expected a quoted argument"),
        ("Host(a)", 5, "expected a quoted argument"),
        ("Host(`a` `b`)", 9, "expected ',' or ')'"),
        ("Host(`a`,)", 9, "expected a quoted argument"),
        ("Host", 4, "expected '(' after 'Host'"),
        ("Host(`a`) Path(`b`)", 10, "expected '&&', '||'"),
        ("Host(`a`) &&", 12, "expected a matcher"),
        ("&& Host(`a`)", 0, "expected a matcher"),
        ("Host(`a`) & Path(`b`)", 10, "unexpected character '&'"),
        ("Host(`a`) ; x", 10, "unexpected character ';'"),
        ("`a`", 0, "expected a matcher"),
        ("()", 1, "expected a matcher"),
    ],
)
def test_errors_have_a_position_and_a_reason(rule, pos, reason):
    with pytest.raises(RuleError) as exc:
        parse_rule(rule)
    assert exc.value.pos == pos
    assert exc.value.reason.startswith(reason)
    assert str(exc.value).endswith(f"at character {pos + 1}")


def test_depth_limit():
    ok = "(" * MAX_DEPTH + "Host(`a`)" + ")" * MAX_DEPTH
    assert parse_rule(ok) == Matcher("Host", ("a",), MAX_DEPTH)
    with pytest.raises(RuleError, match="nested more than"):
        parse_rule("(" + ok + ")")
    with pytest.raises(RuleError, match="nested more than"):
        parse_rule("!" * (MAX_DEPTH + 1) + "Host(`a`)")


def test_long_names_are_cut_in_messages():
    with pytest.raises(RuleError) as exc:
        parse_rule("H" * 10_000)
    assert len(str(exc.value)) < 120


@pytest.mark.parametrize(
    "rule, hosts",
    [
        ("Host(`a`, `b`) && PathPrefix(`/x`) || host(`c`)", ["a", "b", "c"]),
        ("Host(`a`) && !Host(`b`)", ["a"]),  # a negated Host is not a declared host
        ("Host(`a`", ["a"]),  # the rule lost its ")": what was read is still known
        ("Host(`a`) && Header(`X`, `1`) && Host(`b` `c`)", ["a", "b", "c"]),
        ("Host(`a`) && PathPrefix(`/x", ["a"]),  # stops at the unterminated string
        ("HostRegexp(`a`) || Hosts(`b`) || Host `c`", []),
        ("", []),
    ],
)
def test_host_arguments_read_as_far_as_the_rule_tokenizes(rule, hosts):
    assert host_arguments(rule) == hosts
