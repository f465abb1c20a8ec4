"""Routes in the rules (``via=next-hop``, ``via=direct``) and `through_next_hop`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from twisted.python import usage

from socksident.policy import Decision, IdentMode, PolicyContext, Route, through_next_hop
from socksident.rules import RulesError, RulesPolicy, parse_rules
from socksident.socks4 import Command, ReplyCode, Request, RequestRejectedOrFailed
from socksident.tap import Options

GRANT = Decision(ReplyCode.GRANTED, "permitted by r.conf:1", "r.conf:1")


def parse_error(text: str) -> str:
    with pytest.raises(RulesError) as info:
        parse_rules(text, "r.conf")
    return str(info.value)


@pytest.mark.parametrize(
    "line, route",
    [
        ("permit via=next-hop 0.0.0.0/0 .internal.example", Route.NEXT_HOP),
        ("permit via=direct 10.1.0.0/16", Route.DIRECT),
        ("permit ?=I via=next-hop *=alice 10.0.0.0/8", Route.NEXT_HOP),
        ("permit connect via=direct ?=n 10.0.0.0/8", Route.DIRECT),
        ("permit 10.0.0.0/8", None),
    ],
)
def test_a_route_is_an_option_beside_ident_and_users(line: str, route: Route) -> None:
    (rule,) = parse_rules(line, "r.conf").rules
    assert rule.route is route


@pytest.mark.parametrize(
    "line, message",
    [
        ("permit via=elsewhere 0.0.0.0/0", "r.conf:1: unknown route 'via=elsewhere'; expected via=next-hop or via=direct"),
        ("permit via=direct via=next-hop 0.0.0.0/0", "r.conf:1: second route 'via=next-hop'; expected at most one via="),
        ("deny via=direct 0.0.0.0/0", "r.conf:1: a route (via=...) on a deny line; routes go on permit lines"),
    ],
)
def test_a_bad_route_names_the_line(line: str, message: str) -> None:
    assert parse_error(line) == message


def request(host: str = "db.internal.example", command: Command = Command.CONNECT) -> Request:
    return Request(command, 5432, "0.0.0.1", "alice", host)


def context(client: str, addresses: tuple[str, ...] = ()) -> PolicyContext:
    def no_ident() -> object:
        raise AssertionError("ident is not asked under ?=n")

    return PolicyContext(client, 40000, "10.0.0.1", 1080, addresses, no_ident)  # type: ignore[arg-type]


def test_the_permitting_line_gives_its_route_to_the_decision(tmp_path: Path) -> None:
    rules = tmp_path / "r.conf"
    rules.write_text(
        "permit ?=n via=next-hop 10.0.0.0/8 .internal.example\n"
        "permit ?=n via=direct 10.1.0.0/16\n"
        "permit ?=n 10.0.0.0/8\n"
    )
    policy = RulesPolicy(str(rules), IdentMode.OFF)
    internal = policy.check(request(), context("10.2.0.1"))
    assert isinstance(internal, Decision) and internal.granted
    assert internal.route is Route.NEXT_HOP and internal.rule == f"{rules}:1"
    direct = policy.check(request("www.example.com"), context("10.1.0.7", ("192.0.2.1",)))
    assert isinstance(direct, Decision) and direct.route is Route.DIRECT
    plain = policy.check(request("www.example.com"), context("10.2.0.1", ("192.0.2.1",)))
    assert isinstance(plain, Decision) and plain.route is None


@pytest.mark.parametrize(
    "route, resolved, have_hop, expected",
    [
        (None, True, True, False),  # the default: direct when it resolves
        (None, False, True, True),  # ...and the next hop when it does not
        (None, True, False, False),
        (Route.NEXT_HOP, True, True, True),  # even when it resolves here
        (Route.NEXT_HOP, False, True, True),
        (Route.DIRECT, True, True, False),
    ],
)
def test_through_next_hop(route, resolved, have_hop, expected) -> None:
    decision = Decision(ReplyCode.GRANTED, "ok", "r.conf:1", route=route)
    assert through_next_hop(decision, "db.internal.example", resolved, have_hop) is expected


@pytest.mark.parametrize(
    "route, resolved, have_hop, reason",
    [
        (Route.DIRECT, False, True,
         "db.internal.example does not resolve here, and r.conf:1 forbids the next hop (via=direct)"),
        (Route.NEXT_HOP, True, False,
         "r.conf:1 sends db.internal.example via the next hop, but no --next-hop is set"),
        (None, False, False, "db.internal.example does not resolve"),
    ],
)
def test_a_route_that_cannot_be_followed_is_91_saying_why(route, resolved, have_hop, reason) -> None:
    decision = Decision(ReplyCode.GRANTED, "ok", "r.conf:1", route=route)
    with pytest.raises(RequestRejectedOrFailed) as info:
        through_next_hop(decision, "db.internal.example", resolved, have_hop)
    assert info.value.reason == reason and info.value.code == 91


def test_via_next_hop_without_a_next_hop_is_a_usage_error_naming_the_line(tmp_path: Path) -> None:
    rules = tmp_path / "r.conf"
    rules.write_text("permit 127.0.0.0/8\npermit via=next-hop 0.0.0.0/0 .internal.example\n")
    with pytest.raises(usage.UsageError) as info:
        Options().parseOptions(["--rules", str(rules)])
    assert str(info.value) == (
        f"{rules}:2: via=next-hop, but no --next-hop is set;"
        " add --next-hop ENDPOINT or remove via=next-hop"
    )
    options = Options()
    options.parseOptions(["--rules", str(rules), "--next-hop", "tcp:host=127.0.0.1:port=1"])
    assert options["next_hop"] is not None


def route_lines(rules: Path, *args: str) -> list[str]:
    run = subprocess.run(
        [sys.executable, "-m", "socksident.rules", str(rules), "--no-identd", *args],
        capture_output=True, text=True, timeout=60,
    )
    return [line for line in run.stdout.splitlines() if line.startswith(("decision", "route"))]


def test_the_tester_shows_the_route(tmp_path: Path) -> None:
    rules = tmp_path / "r.conf"
    rules.write_text(
        "permit via=next-hop 127.0.0.0/8 .internal.example\n"
        "permit via=direct 10.1.0.0/16\n"
        "permit 127.0.0.0/8\n"
    )
    assert route_lines(rules, "--src", "127.0.0.1", "--dst", "db.internal.example:5432",
                  "--addresses", "10.5.5.5", "--next-hop") == [
        f"decision: permit (90): permitted by {rules}:1",
        "route: through the next hop (via=next-hop)",
    ]
    assert route_lines(rules, "--src", "127.0.0.1", "--dst", "nowhere.test:80", "--next-hop") == [
        f"decision: permit (90): permitted by {rules}:3",
        "route: through the next hop (the name does not resolve here)",
    ]
    assert route_lines(rules, "--src", "10.1.2.3", "--dst", "nowhere.test:80", "--next-hop") == [
        f"decision: deny (91): nowhere.test does not resolve here, and {rules}:2 forbids"
        " the next hop (via=direct)",
    ]
    assert route_lines(rules, "--src", "127.0.0.1", "--dst", "127.0.0.1:80") == [
        f"decision: permit (90): permitted by {rules}:3",
    ]


@pytest.mark.parametrize(
    "route, resolved, reason",
    [
        # a via=next-hop line names the hop as the reason even for a name
        # that does not resolve here either
        (Route.NEXT_HOP, False,
         "the policy sends db.internal.example via the next hop, but no --next-hop is set"),
        (Route.DIRECT, False,
         "db.internal.example does not resolve here, and the policy forbids the next hop"
         " (via=direct)"),
    ],
)
def test_a_decision_without_a_rule_is_named_the_policy(route, resolved, reason) -> None:
    decision = Decision(ReplyCode.GRANTED, "ok", route=route)
    with pytest.raises(RequestRejectedOrFailed) as info:
        through_next_hop(decision, "db.internal.example", resolved, False)
    assert info.value.reason == reason
