"""wakeproxy.policy: one owner per name, wildcards, the operator's allow-list, persistence."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from wakeproxy.config import SourcesConfig
from wakeproxy.routing.labels import ContainerInfo
from wakeproxy.routing.policy import Claim, GroupId, NamePolicy, Ownership
from wakeproxy.routing.snapshot import Policy, build_snapshot


def G(base: str, kind: str = "compose") -> GroupId:
    return GroupId(kind, base)


def claim(name: str, group: str, created: float = 0.0, kind: str = "compose") -> Claim:
    return Claim(name, group, GroupId(kind, group), created, f"{group}-web-1")


def resolve(own: Ownership, *claims: Claim, policy: NamePolicy | None = None, now: float = 1000.0):
    return own.resolve(claims, policy or NamePolicy(), now)


# --- one owner per name ----------------------------------------------------------------------


def test_first_claim_owns_and_a_second_group_is_refused_even_when_created_first_later():
    own = Ownership()
    owners, refused = resolve(own, claim("app.test", "victim", created=10))
    assert owners == {"app.test": "victim"} and refused == []
    # The attacker's container is older (created earlier): ownership still stays with the owner.
    owners, refused = resolve(own, claim("app.test", "victim", created=10), claim("app.test", "attacker", created=1))
    assert owners == {"app.test": "victim"}
    assert [(r.name, r.group, r.owner) for r in refused] == [("app.test", "attacker", "victim")]
    assert "owned by group 'victim'" in refused[0].reason


def test_without_records_the_oldest_container_wins_then_the_group_name():
    owners, _ = resolve(Ownership(), claim("a.test", "b", created=5), claim("a.test", "a", created=7))
    assert owners == {"a.test": "b"}
    owners, _ = resolve(Ownership(), claim("a.test", "b", created=5), claim("a.test", "a", created=5))
    assert owners == {"a.test": "a"}


@pytest.mark.parametrize("seed", range(5))
def test_the_winner_does_not_depend_on_claim_order(seed):
    claims = [claim(f"n{i % 4}.test", f"g{i}", created=i % 3) for i in range(12)]
    results = set()
    rnd = random.Random(seed)
    for _ in range(10):
        rnd.shuffle(claims)
        owners, _ = resolve(Ownership(), *claims)
        results.add(tuple(sorted(owners.items())))
    assert len(results) == 1


def test_an_owner_with_a_stopped_container_keeps_its_name():
    # Claims come from every container, running or not (the snapshot makes no difference).
    victim = ContainerInfo("v", "victim-web-1", "exited", labels={"wakeproxy.host": "app.test",
                           "com.docker.compose.project": "victim"}, networks={"bridge": ""}, created=1)
    attacker = ContainerInfo("a", "attacker-web-1", "running", labels={"wakeproxy.host": "app.test",
                             "com.docker.compose.project": "attacker"}, networks={"bridge": "172.17.0.9"}, created=2)
    snap = build_snapshot([victim, attacker], SourcesConfig(), (), {})
    assert [b.container_name for b in snap.lookup("app.test").backends] == ["victim-web-1"]
    assert snap.lookup("app.test").ready_backends == ()  # asleep: the request wakes the victim


def test_ownership_moves_only_after_the_owner_is_gone_for_release_after():
    own = Ownership()
    policy = NamePolicy(release_after=60)
    resolve(own, claim("app.test", "victim"), policy=policy, now=1000)
    # No snapshot for a long while (a quiet server), then the victim's containers are removed:
    # the clock starts at the first snapshot without its claim, not at the last one with it.
    owners, refused = resolve(own, claim("app.test", "attacker"), policy=policy, now=5000)
    assert owners == {} and "still held for group 'victim'" in refused[0].reason
    assert own.next_release(60) == 5060
    owners, refused = resolve(own, claim("app.test", "attacker"), policy=policy, now=5059)
    assert owners == {}
    owners, refused = resolve(own, claim("app.test", "attacker"), policy=policy, now=5061)
    assert owners == {"app.test": "attacker"} and refused == []
    assert own.next_release(60) is None


def test_a_recreated_owner_keeps_its_name_within_release_after():
    own = Ownership()
    resolve(own, claim("app.test", "victim"), now=1000)
    resolve(own, claim("app.test", "attacker"), now=1010)  # victim's containers are being recreated
    owners, _ = resolve(own, claim("app.test", "victim", created=1011), claim("app.test", "attacker"), now=1012)
    assert owners == {"app.test": "victim"}


def test_kind_is_part_of_who_owns():
    # A Compose project named like a lone container does not inherit that container's names.
    own = Ownership()
    resolve(own, claim("app.test", "web", kind="container"))
    owners, refused = resolve(own, claim("app.test", "web", kind="container"), claim("app.test", "web", kind="compose"))
    assert owners == {"app.test": "web"}
    assert len(refused) == 1


# --- wildcards ------------------------------------------------------------------------------------


def test_names_under_another_groups_wildcard_are_refused():
    own = Ownership()
    resolve(own, claim("*.pr.test", "owner"))
    owners, refused = resolve(own, claim("*.pr.test", "owner"), claim("x.pr.test", "thief"),
                              claim("*.a.pr.test", "thief"))
    assert owners == {"*.pr.test": "owner"}
    assert {r.name for r in refused} == {"x.pr.test", "*.a.pr.test"}
    assert all("overlaps names of group 'owner'" in r.reason for r in refused)


def test_a_wildcard_over_another_groups_names_is_refused():
    own = Ownership()
    resolve(own, claim("a.shop.test", "shop"))
    owners, refused = resolve(own, claim("a.shop.test", "shop"), claim("*.shop.test", "thief"))
    assert owners == {"a.shop.test": "shop"} and refused[0].name == "*.shop.test"


def test_a_group_may_combine_its_own_wildcard_and_names():
    owners, refused = resolve(Ownership(), claim("*.pr.test", "g"), claim("www.pr.test", "g"),
                              claim("*.api.pr.test", "g"), claim("pr.test", "other"))
    assert owners == {"*.pr.test": "g", "www.pr.test": "g", "*.api.pr.test": "g", "pr.test": "other"}
    assert refused == []


def test_wildcard_rules_of_the_policy():
    p = NamePolicy()
    assert "at least two labels" in p.refuse("*.com", G("g"))
    assert p.refuse("*.example.com", G("g")) is None
    assert "names.wildcards" in NamePolicy(wildcards=False).refuse("*.example.com", G("g"))


# --- the operator's policy -----------------------------------------------------------------


def test_allow_list_with_group_placeholder():
    p = NamePolicy(allow=("{group}.sb.example.com", "*.{group}.sb.example.com", "docs.example.com"))
    assert p.refuse("pr-42.sb.example.com", G("pr-42")) is None
    assert p.refuse("a.b.pr-42.sb.example.com", G("pr-42")) is None
    assert p.refuse("*.pr-42.sb.example.com", G("pr-42")) is None
    assert p.refuse("docs.example.com", G("pr-42")) is None
    assert p.refuse("pr-43.sb.example.com", G("pr-42")) == "outside names.allow"
    assert p.refuse("www.some-bank.example", G("pr-42")) == "outside names.allow"
    assert p.refuse("*.sb.example.com", G("pr-42")) == "outside names.allow"
    # A group split with wakeproxy.group (project/group) stands for its project.
    assert p.refuse("pr-42.sb.example.com", G("pr-42/api")) is None


def test_reserved_entries_may_name_the_kind_of_group():
    p = NamePolicy(reserved={"home.test": "container:landing", "any.test": "landing"})
    assert p.refuse("home.test", G("landing", "container")) is None
    assert "reserved for group 'container:landing'" in p.refuse("home.test", G("landing", "compose"))
    assert p.refuse("any.test", G("landing", "compose")) is None
    assert p.refuse("any.test", G("landing", "container")) is None


def test_group_placeholder_stands_for_compose_projects_only():
    # A lone container or a wakeproxy.group outside Compose cannot pre-claim a future project's names.
    p = NamePolicy(allow=("{group}.sb.test", "ops.test"))
    assert p.refuse("pr-1.sb.test", G("pr-1/api", "compose")) is None
    assert p.refuse("n.sb.test", G("n", "container")) == "outside names.allow"
    assert p.refuse("n.sb.test", G("n", "group")) == "outside names.allow"
    assert p.refuse("ops.test", G("n", "container")) is None


def test_default_host_and_reserved_names():
    p = NamePolicy(default_host="fallback.test", reserved={"fallback.test": "landing"})
    assert p.refuse("fallback.test", G("landing")) is None
    assert "reserved for group 'landing'" in p.refuse("fallback.test", G("attacker"))
    assert "labels may claim only when names.reserved" in NamePolicy(default_host="fallback.test").refuse(
        "fallback.test", "anyone")
    p2 = NamePolicy(default_host="www.fallback.test", reserved={"www.fallback.test": "landing"})
    assert "covers the default_host" in p2.refuse("*.fallback.test", G("attacker"))
    # With a default host, a wildcard would take unknown names from it unless the operator allowed it.
    assert "names.allow" in p.refuse("*.other.test", G("g"))
    assert NamePolicy(default_host="fallback.test", allow=("*.other.test",)).refuse("*.x.other.test", G("g")) is None


def test_names_per_group_are_capped():
    owners, refused = resolve(Ownership(), *(claim(f"n{i}.test", "g") for i in range(5)),
                              policy=NamePolicy(max_per_group=3))
    assert len(owners) == 3 and len(refused) == 2
    assert all("names.max_per_group" in r.reason for r in refused)


def test_policy_in_the_snapshot_hides_refused_names_everywhere():
    c = ContainerInfo("x", "pr-1-web-1", "running", labels={
        "wakeproxy.host": "pr-1.sb.test,evil.test", "com.docker.compose.project": "pr-1"},
        networks={"bridge": "172.17.0.2"})
    snap = build_snapshot([c], SourcesConfig(), (), {},
                          policy=Policy(names=NamePolicy(allow=("{group}.sb.test",))))
    assert snap.hosts == ["pr-1.sb.test"]
    assert snap.lookup("evil.test") is None
    assert [(r.name, r.reason) for r in snap.refused] == [("evil.test", "outside names.allow")]


# --- persistence -----------------------------------------------------------------------------------


def test_records_survive_a_restart_with_the_claimants_in_reverse_order(tmp_path):
    path = tmp_path / "owners.json"
    own = Ownership()
    # The victim was first; the attacker's container is older (it could win on creation time alone).
    resolve(own, claim("app.test", "victim", created=50))
    resolve(own, claim("app.test", "victim", created=50), claim("app.test", "attacker", created=1))
    path.write_bytes(own.encode())
    again = Ownership()
    again.load(path)
    owners, refused = resolve(again, claim("app.test", "attacker", created=1), claim("app.test", "victim", created=50))
    assert owners == {"app.test": "victim"} and refused[0].group == "attacker"


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"version": 1}', b'{"version": 1, "owners": {"a b": {}}}',
                                     json.dumps({"version": 1, "owners": {"a.test": {"group": "g", "kind": "compose",
                                                 "base": "g", "since": "nan", "seen": 1}}}).encode()])
def test_a_corrupt_owners_file_is_ignored(tmp_path, caplog, content):
    path = tmp_path / "owners.json"
    path.write_bytes(content)
    own = Ownership()
    own.load(path)
    assert "is corrupt" in caplog.text
    owners, _ = resolve(own, claim("a.test", "g"))
    assert owners == {"a.test": "g"}


def test_refusals_are_logged_once(caplog):
    own = Ownership()
    resolve(own, claim("a.test", "v"))
    for _ in range(3):
        resolve(own, claim("a.test", "v"), claim("a.test", "x"))
    assert caplog.text.count("refused") == 1


def test_resolve_is_linear_enough_for_a_thousand_groups():
    import time

    claims = [claim(f"s{i}.example.com", f"g{i}") for i in range(1000)]
    claims += [claim(f"*.w{i}.example.com", f"g{i}") for i in range(1000)]
    claims += [claim(f"s{i}.example.com", f"thief{i}") for i in range(1000)]
    own = Ownership()
    t0 = time.perf_counter()
    owners, refused = resolve(own, *claims)
    assert len(owners) == 2000 and len(refused) == 1000
    assert time.perf_counter() - t0 < 2.0  # a generous bound: it is ~20 ms here


def test_every_pair_of_overlapping_claims_has_one_winner():
    names = ["a.x.test", "*.x.test", "x.test", "*.a.x.test", "b.a.x.test"]
    for first, second in itertools.permutations(names, 2):
        owners, refused = resolve(Ownership(), claim(first, "one", created=1), claim(second, "two", created=2))
        assert owners[first] == "one"
        overlap = (
            first == second
            or (first.startswith("*.") and (second.endswith("." + first[2:])))
            or (second.startswith("*.") and first.endswith("." + second[2:]))
        )
        assert (second in owners) != overlap, (first, second, owners, refused)
