"""The rules file: parser, decisions, commands, reload and the rule tester."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.logger import capturedLogs

from socksident.ident import IdentAnswer, IdentOutcome
from socksident.policy import IdentMode
from socksident.policy import Decision, DecisionResult, PolicyContext
from socksident.rules import (
    Action,
    AddressMask,
    DomainSuffix,
    PortTest,
    Rule,
    RulesError,
    RulesPolicy,
    load_rules,
    parse_rules,
    expand_command,
    sanitize,
)
from socksident.socks4 import Command, ReplyCode, Request

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = "examples/sockd.conf"

ALICE = IdentAnswer(IdentOutcome.USER, user_id="alice")
MALLORY = IdentAnswer(IdentOutcome.USER, user_id="mallory")
NO_ANSWER = IdentAnswer(IdentOutcome.NO_ANSWER, error="connection refused")


# --- helpers -----------------------------------------------------------------


def request(
    port: int = 80,
    address: str = "192.0.2.1",
    user: str = "alice",
    hostname: Optional[str] = None,
    command: Command = Command.CONNECT,
) -> Request:
    if hostname is not None:
        address = "0.0.0.1"
    return Request(command, port, address, user, hostname)


class FakeIdent:
    """PolicyContext.ident answering at once (or never, with `pending`)."""

    def __init__(self, answer: Optional[IdentAnswer] = None) -> None:
        self.answer = answer
        self.calls = 0
        self.pending: Deferred[IdentAnswer] = Deferred()

    def __call__(self) -> Deferred[IdentAnswer]:
        self.calls += 1
        if self.answer is None:
            return self.pending
        return succeed(self.answer)


def context(
    client: str = "10.1.2.3",
    addresses: tuple[str, ...] = ("192.0.2.1",),
    ident: Optional[FakeIdent] = None,
) -> PolicyContext:
    return PolicyContext(client, 40000, "10.0.0.1", 1080, addresses, ident or FakeIdent(ALICE))


def rule(line: str) -> Rule:
    (parsed,) = parse_rules(line, "t.conf").rules
    return parsed


def parse_error(text: str) -> str:
    with pytest.raises(RulesError) as info:
        parse_rules(text, "sockd.conf")
    return str(info.value)


def result(outcome: DecisionResult) -> Decision:
    """The decision of an already-fired result."""
    if isinstance(outcome, Decision):
        return outcome
    results: list[Any] = []
    outcome.addBoth(results.append)
    assert results, "the decision has not fired"
    assert isinstance(results[0], Decision), results[0]
    return results[0]


class Policy:
    """A RulesPolicy over a file in tmp_path, recording the commands it runs."""

    def __init__(self, tmp_path: Path, text: str, mode: IdentMode = IdentMode.OFF) -> None:
        self.path = tmp_path / "sockd.conf"
        self.path.write_text(text)
        self.commands: list[str] = []
        self.policy = RulesPolicy(str(self.path), mode, run_command=self.commands.append)

    def check(self, req: Request, ctx: Optional[PolicyContext] = None) -> Decision:
        """Decide, then run `on_granted` as the server does once it replied 90."""
        decision = result(self.policy.check(req, ctx or context(addresses=(req.address,))))
        if decision.granted and decision.on_granted is not None:
            decision.on_granted()
        return decision

    def line(self, decision: Decision) -> int:
        assert decision.rule is not None, decision
        return int(decision.rule.rsplit(":", 1)[1])


# --- parser: one test per field ------------------------------------------------


def test_action_and_source_addr_mask() -> None:
    parsed = rule("deny 10.1.0.0 255.255.0.0")
    assert parsed.action is Action.DENY
    assert parsed.source == AddressMask(4, 0x0A010000, 0xFFFF0000)
    assert parsed.destination is None and parsed.port is None and parsed.users is None
    assert rule("permit 10.0.0.0 255.0.0.0").action is Action.PERMIT


def test_rule_keeps_location_and_text() -> None:
    parsed = parse_rules("# comment\n\n  permit 10.0.0.0/8 # why\n", "site.conf").rules[0]
    assert (parsed.filename, parsed.lineno, parsed.location) == ("site.conf", 3, "site.conf:3")
    assert parsed.text == "permit 10.0.0.0/8 # why"


def test_tabs_and_spaces_separate_fields() -> None:
    assert rule("permit\t10.0.0.0 \t255.0.0.0\t\teq\t80").port == PortTest("eq", 80)


def test_source_cidr_and_ipv6_cidr() -> None:
    assert rule("permit 10.0.0.0/8").source == AddressMask(4, 0x0A000000, 0xFF000000)
    v6 = rule("permit 2001:db8::/32").source
    assert v6.version == 6 and v6.mask == ((1 << 32) - 1) << 96


def test_destination_addr_mask_cidr_and_suffix() -> None:
    assert rule("permit 10.0.0.0/8 192.0.2.0 255.255.255.0").destination == AddressMask(
        4, 0xC0000200, 0xFFFFFF00
    )
    assert rule("permit 10.0.0.0/8 192.0.2.0/24").destination == AddressMask(
        4, 0xC0000200, 0xFFFFFF00
    )
    assert rule("permit 10.0.0.0/8 .Example.COM.").destination == DomainSuffix(".example.com")


@pytest.mark.parametrize("dst", ["0.0.0.0 0.0.0.0", "0.0.0.0/0", "10.0.0.0 0.0.0.0"])
def test_zero_mask_destination_is_any(dst: str) -> None:
    assert rule(f"permit 10.0.0.0/8 {dst} eq 80").destination is None


@pytest.mark.parametrize("op", ["eq", "neq", "lt", "gt", "le", "ge"])
def test_every_operator(op: str) -> None:
    assert rule(f"permit 10.0.0.0/8 {op} 1024").port == PortTest(op, 1024)


def test_port_by_service_name() -> None:
    assert rule("permit 10.0.0.0/8 0.0.0.0 0.0.0.0 eq https").port == PortTest("eq", 443)


def test_port_test_without_destination() -> None:
    parsed = rule("permit 10.0.0.0/8 ge 1024")
    assert parsed.destination is None and parsed.port == PortTest("ge", 1024)


@pytest.mark.parametrize(
    "option, mode",
    [("?=I", IdentMode.REQUIRE), ("?=i", IdentMode.CHECK), ("?=n", IdentMode.OFF)],
)
def test_ident_option(option: str, mode: IdentMode) -> None:
    assert rule(f"permit {option} 10.0.0.0/8").ident_mode is mode
    assert rule("permit 10.0.0.0/8").ident_mode is None


def test_inline_user_list() -> None:
    assert rule("permit *=alice,bob 10.0.0.0/8").users == frozenset({"alice", "bob"})


def test_options_in_either_order() -> None:
    parsed = rule("permit *=alice ?=I 10.0.0.0/8")
    assert parsed.users == frozenset({"alice"}) and parsed.ident_mode is IdentMode.REQUIRE


def test_user_list_file(tmp_path: Path) -> None:
    users = tmp_path / "staff.users"
    users.write_text("# the staff\ncarol dave, erin\n\nfrank # on leave: not gina\n")
    parsed = rule(f"permit *=alice,{users} 10.0.0.0/8")
    assert parsed.users == frozenset({"alice", "carol", "dave", "erin", "frank"})


def test_user_ids_compare_as_octets(tmp_path: Path) -> None:
    # A USERID is Latin-1-decoded octets; UTF-8 "josé" arrives as "josÃ©".
    wire = "josé".encode("utf-8").decode("latin-1")
    users = tmp_path / "u"
    users.write_bytes("zoë\n".encode("utf-8"))
    parsed = rule(f"permit *=josé,{users} 10.0.0.0/8")
    assert parsed.users == frozenset({wire, "zoë".encode("utf-8").decode("latin-1")})


@pytest.mark.parametrize("word, command", [("connect", Command.CONNECT), ("bind", Command.BIND)])
def test_command_limit(word: str, command: Command) -> None:
    parsed = rule(f"permit {word} ?=i 10.0.0.0/8")
    assert parsed.socks_command is command and parsed.ident_mode is IdentMode.CHECK


def test_shell_command() -> None:
    assert rule("permit 10.0.0.0/8 eq 80 : echo %u >> /tmp/log").shell_command == "echo %u >> /tmp/log"
    assert rule("permit 10.0.0.0/8 ge 1024:echo hi").port == PortTest("ge", 1024)
    assert rule("permit 10.0.0.0/8 ge 1024:echo hi").shell_command == "echo hi"


def test_hash_ends_the_command() -> None:
    assert rule("permit 10.0.0.0/8 : echo hi # not part of it").shell_command == "echo hi"


def test_ipv6_colons_are_not_the_command_separator() -> None:
    parsed = rule("permit ::ffff:0:0/96 2001:db8::/32 eq 80 : echo v6")
    assert parsed.source.version == 6 and parsed.destination == AddressMask(
        6, 0x20010DB8 << 96, ((1 << 32) - 1) << 96
    )
    assert parsed.shell_command == "echo v6"


def test_special_command_lines_last_one_wins() -> None:
    rules = parse_rules(
        "#NO_IDENTD: echo first\n#BAD_ID: echo bad %U\npermit 10.0.0.0/8\n#NO_IDENTD: echo second # kept\n"
    )
    assert rules.no_identd_command == "echo second # kept"
    assert rules.bad_id_command == "echo bad %U"
    assert len(rules.rules) == 1


def test_special_lines_only_in_the_first_column() -> None:
    rules = parse_rules("  #BAD_ID: echo indented\n# #NO_IDENTD: echo commented\n")
    assert rules.bad_id_command is None and rules.no_identd_command is None
    assert rules.rules == ()


def test_comments_and_blank_lines_are_skipped() -> None:
    rules = parse_rules("# all comments\n\n   \t\n#\ndeny 0.0.0.0 0.0.0.0 # trailing\n")
    assert [r.lineno for r in rules.rules] == [5]


def test_longest_line_is_accepted() -> None:
    line = "permit 10.0.0.0/8 : echo " + "x" * (1023 - 25)
    assert len(line) == 1023
    assert rule(line).shell_command is not None


# --- parser: one test per error, with the exact message -----------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("# ok\n\npermit 10.0.0.0/8 0.0.0.0/0 equal 80\n",
         "sockd.conf:3: unknown operator 'equal'; expected one of eq, neq, lt, gt, le, ge"),
        ("permit 10.0.0.0 255.0.0.0 equal 80",
         "sockd.conf:1: unknown operator 'equal'; expected one of eq, neq, lt, gt, le, ge"),
        ("allow 10.0.0.0/8", "sockd.conf:1: unknown action 'allow'; expected permit or deny"),
        ("permit ?=x 10.0.0.0/8", "sockd.conf:1: unknown ident option '?=x'; expected ?=I, ?=i or ?=n"),
        ("permit ?=I ?=i 10.0.0.0/8", "sockd.conf:1: second ident option '?=i'; expected at most one ?="),
        ("permit *=a *=b 10.0.0.0/8", "sockd.conf:1: second user list '*=b'; expected at most one *="),
        ("permit *= 10.0.0.0/8",
         "sockd.conf:1: empty entry in user list '*='; expected user ids or absolute file names separated by commas"),
        ("permit *=a,,b 10.0.0.0/8",
         "sockd.conf:1: empty entry in user list '*=a,,b'; expected user ids or absolute file names separated by commas"),
        ("permit", "sockd.conf:1: missing source address; expected 'src_addr src_mask' or CIDR such as 10.0.0.0/8"),
        ("permit ?=I",
         "sockd.conf:1: missing source address; expected 'src_addr src_mask' or CIDR such as 10.0.0.0/8"),
        ("permit 10.0.0.0",
         "sockd.conf:1: missing source mask after '10.0.0.0'; expected a dotted mask such as 255.255.255.0, "
         "or CIDR such as 10.0.0.0/24"),
        ("permit 10.0.0.300 255.0.0.0",
         "sockd.conf:1: invalid source address '10.0.0.300'; expected a dotted IPv4 address such as 192.168.1.0"),
        ("permit 10.0.0.0 255.0.0",
         "sockd.conf:1: invalid source mask '255.0.0'; expected a dotted IPv4 address such as 192.168.1.0"),
        ("permit 10.0.0.0/33",
         "sockd.conf:1: invalid source network '10.0.0.0/33'; expected CIDR such as 10.0.0.0/8 or 2001:db8::/32"),
        ("permit ::1 ::1", "sockd.conf:1: IPv6 source address '::1' needs CIDR form; expected e.g. ::1/128"),
        ("permit 10.0.0.0/8 192.0.2.1",
         "sockd.conf:1: missing destination mask after '192.0.2.1'; expected a dotted mask such as "
         "255.255.255.0, or CIDR such as 192.0.2.1/24"),
        ("permit 10.0.0.0/8 example.com 255.0.0.0",
         "sockd.conf:1: invalid destination address 'example.com'; expected a dotted IPv4 address such as "
         "192.168.1.0"),
        ("permit 10.0.0.0/8 .exa_mple-.com",
         "sockd.conf:1: invalid domain suffix '.exa_mple-.com'; expected a name such as .example.com"),
        ("permit 10.0.0.0/8 .", "sockd.conf:1: invalid domain suffix '.'; expected a name such as .example.com"),
        ("permit 10.0.0.0/8 80",
         "sockd.conf:1: port '80' without an operator; expected 'eq 80' or another of eq, neq, lt, gt, le, ge"),
        ("permit 10.0.0.0/8 eq",
         "sockd.conf:1: missing port after 'eq'; expected a port number or a service name such as http"),
        ("permit 10.0.0.0/8 eq 65536", "sockd.conf:1: port 65536 out of range; expected 0-65535"),
        ("permit 10.0.0.0/8 eq nosuchservice",
         "sockd.conf:1: unknown service 'nosuchservice'; expected a port number or a TCP service name from "
         "/etc/services"),
        ("permit 10.0.0.0/8 eq 80 extra",
         "sockd.conf:1: unexpected 'extra' after the port; expected ': command' or the end of the line"),
        ("permit 10.0.0.0/8 :", "sockd.conf:1: empty command after ':'; expected a shell command"),
        ("permit 10.0.0.0/8 : # only a comment", "sockd.conf:1: empty command after ':'; expected a shell command"),
        (": echo hi", "sockd.conf:1: a command without a rule; expected 'permit|deny ... : command'"),
        ("permit 10.0.0.0/8 : echo %x",
         "sockd.conf:1: unknown substitution '%x' in the command; expected one of "
         "%A %a %c %p %S %s %U %u %Z %z %%"),
        ("permit 10.0.0.0/8 : echo 100%",
         "sockd.conf:1: a lone '%' ends the command; write '%%' for a percent sign"),
        ("#BAD_ID:   ", "sockd.conf:1: empty command after '#BAD_ID:'; expected a shell command"),
        ("#NO_IDENTD: echo %q",
         "sockd.conf:1: unknown substitution '%q' in the command; expected one of "
         "%A %a %c %p %S %s %U %u %Z %z %%"),
        ("deny 0.0.0.0 0.0.0.0 : " + "x" * 1001,
         "sockd.conf:1: line is 1024 characters long; expected at most 1023"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    assert parse_error(text) == message


def test_unreadable_user_list_names_line_and_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.users"
    message = parse_error(f"# staff\npermit *=alice,{missing} 10.0.0.0/8\n")
    assert message == (
        f"sockd.conf:2: cannot read user list '{missing}': No such file or directory; "
        "expected a readable file of user ids"
    )


def test_load_rules_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "site.conf"
    path.write_text("permit 10.0.0.0/8\nperm 10.0.0.0/8\n")
    with pytest.raises(RulesError, match=rf"^{path}:2: unknown action 'perm'"):
        load_rules(str(path))
    assert load_rules(str(REPO / EXAMPLE)).rules[0].action is Action.DENY


def test_load_rules_unreadable_and_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(RulesError, match=r"nope.conf: cannot read the rules file: No such file"):
        load_rules(str(tmp_path / "nope.conf"))
    bad = tmp_path / "latin.conf"
    bad.write_bytes(b"permit 10.0.0.0/8\n# caf\xe9\n")
    with pytest.raises(RulesError, match=rf"^{bad}:2: not UTF-8; expected a UTF-8 text file$"):
        load_rules(str(bad))


# --- decisions ---------------------------------------------------------------------

TABLE = """\
deny 10.1.1.0 255.255.255.0
permit ?=n 10.0.0.0 255.0.0.0 192.0.2.0 255.255.255.0 eq 80
permit ?=n *=alice,bob 10.0.0.0/8 198.51.100.0/24 ge 1024
permit ?=I 10.0.0.0/8 203.0.113.0/24 eq 22
permit ?=i 10.0.0.0/8 203.0.113.0/24 eq 23
permit 10.0.0.0/8 203.0.113.0/24 neq 25
"""


@pytest.mark.parametrize(
    "client, dst, port, user, answer, code, line",
    [
        ("10.1.1.9", "192.0.2.1", 80, "alice", ALICE, ReplyCode.REJECTED, 1),  # denied host
        ("10.2.0.1", "192.0.2.1", 80, "alice", ALICE, ReplyCode.GRANTED, 2),  # src/dst/eq
        ("11.0.0.1", "192.0.2.1", 80, "alice", ALICE, ReplyCode.REJECTED, None),  # src miss
        ("10.2.0.1", "192.0.3.1", 80, "alice", ALICE, ReplyCode.REJECTED, None),  # dst miss
        ("10.2.0.1", "192.0.2.1", 81, "alice", ALICE, ReplyCode.REJECTED, None),  # port miss
        ("10.2.0.1", "198.51.100.7", 1024, "bob", ALICE, ReplyCode.GRANTED, 3),  # ge, user
        ("10.2.0.1", "198.51.100.7", 1023, "bob", ALICE, ReplyCode.REJECTED, None),  # ge miss
        ("10.2.0.1", "198.51.100.7", 2000, "carol", ALICE, ReplyCode.REJECTED, None),  # user miss
        ("10.2.0.1", "203.0.113.5", 22, "alice", ALICE, ReplyCode.GRANTED, 4),  # ?=I confirmed
        ("10.2.0.1", "203.0.113.5", 22, "alice", NO_ANSWER, ReplyCode.IDENTD_UNREACHABLE, 4),
        ("10.2.0.1", "203.0.113.5", 22, "alice", MALLORY, ReplyCode.IDENT_MISMATCH, 4),
        ("10.2.0.1", "203.0.113.5", 23, "alice", NO_ANSWER, ReplyCode.GRANTED, 5),  # lenient
        ("10.2.0.1", "203.0.113.5", 23, "alice", MALLORY, ReplyCode.IDENT_MISMATCH, 5),
        ("10.2.0.1", "203.0.113.5", 24, "alice", MALLORY, ReplyCode.GRANTED, 6),  # global off
        ("10.2.0.1", "203.0.113.5", 25, "alice", ALICE, ReplyCode.REJECTED, None),  # neq miss
    ],
)
def test_decision_table(
    tmp_path: Path,
    client: str,
    dst: str,
    port: int,
    user: str,
    answer: IdentAnswer,
    code: ReplyCode,
    line: Optional[int],
) -> None:
    policy = Policy(tmp_path, TABLE)
    decision = policy.check(request(port, dst, user), context(client, (dst,), FakeIdent(answer)))
    assert decision.code is code, decision
    if line is None:
        assert decision.rule is None and decision.reason == f"no rule matches {dst}"
    else:
        assert policy.line(decision) == line


@pytest.mark.parametrize(
    "mode, answer, code",
    [
        (IdentMode.OFF, MALLORY, ReplyCode.GRANTED),
        (IdentMode.CHECK, NO_ANSWER, ReplyCode.GRANTED),
        (IdentMode.CHECK, MALLORY, ReplyCode.IDENT_MISMATCH),
        (IdentMode.REQUIRE, NO_ANSWER, ReplyCode.IDENTD_UNREACHABLE),
        (IdentMode.REQUIRE, ALICE, ReplyCode.GRANTED),
    ],
)
def test_global_mode_applies_to_lines_without_option(
    tmp_path: Path, mode: IdentMode, answer: IdentAnswer, code: ReplyCode
) -> None:
    policy = Policy(tmp_path, "permit 10.0.0.0/8\n", mode)
    ident = FakeIdent(answer)
    decision = policy.check(request(), context(ident=ident))
    assert decision.code is code
    assert ident.calls == (0 if mode is IdentMode.OFF else 1)


def test_line_option_overrides_global_mode(tmp_path: Path) -> None:
    policy = Policy(tmp_path, "permit ?=n 10.0.0.0/8 eq 80\npermit ?=I 10.0.0.0/8\n", IdentMode.CHECK)
    ident = FakeIdent(NO_ANSWER)
    assert policy.check(request(80), context(ident=ident)).code is ReplyCode.GRANTED
    assert ident.calls == 0
    assert policy.check(request(81), context(ident=ident)).code is ReplyCode.IDENTD_UNREACHABLE


def test_ident_is_not_asked_for_a_deny_line(tmp_path: Path) -> None:
    policy = Policy(tmp_path, "deny 10.0.0.0/8\n", IdentMode.REQUIRE)
    ident = FakeIdent(ALICE)
    assert policy.check(request(), context(ident=ident)).code is ReplyCode.REJECTED
    assert ident.calls == 0


def test_first_match_wins(tmp_path: Path) -> None:
    policy = Policy(tmp_path, "permit 10.1.0.0/16\ndeny 10.0.0.0/8\npermit 10.1.2.3/32\n")
    assert policy.line(policy.check(request(), context("10.1.2.3"))) == 1
    assert policy.check(request(), context("10.2.0.1")).code is ReplyCode.REJECTED
    assert policy.line(policy.check(request(), context("10.2.0.1"))) == 2


def test_no_match_denies(tmp_path: Path) -> None:
    policy = Policy(tmp_path, "# nothing but comments\n")
    decision = policy.check(request(), context())
    assert decision.code is ReplyCode.REJECTED
    assert (decision.rule, decision.reason) == (None, "no rule matches 192.0.2.1")


def test_classic_non_contiguous_mask(tmp_path: Path) -> None:
    policy = Policy(tmp_path, "permit 10.0.0.5 255.0.0.255\n")
    assert policy.check(request(), context("10.77.3.5")).granted
    assert not policy.check(request(), context("10.77.3.6")).granted


@pytest.mark.parametrize("command, line", [(Command.CONNECT, 2), (Command.BIND, 1)])
def test_bind_and_connect_limited_lines(tmp_path: Path, command: Command, line: int) -> None:
    policy = Policy(tmp_path, "permit bind 10.0.0.0/8 eq 20\npermit connect 10.0.0.0/8\n")
    assert policy.line(policy.check(request(20, command=command))) == line


def test_bind_only_rules_refuse_connect(tmp_path: Path) -> None:
    policy = Policy(tmp_path, "permit bind 10.0.0.0/8\n")
    assert policy.check(request(command=Command.BIND)).granted
    assert not policy.check(request(command=Command.CONNECT)).granted


@pytest.mark.parametrize(
    "client, granted_line",
    [
        ("2001:db8:1::5", 2),
        ("2001:db8:2::5", None),  # outside the v6 network; the v4 any-line does not apply
        ("10.1.2.3", 3),
        ("::ffff:10.1.2.3", 3),  # IPv4-mapped is matched as IPv4
        ("fe80::1%eth0", 1),
    ],
)
def test_ipv6_clients(tmp_path: Path, client: str, granted_line: Optional[int]) -> None:
    policy = Policy(tmp_path, "permit fe80::/10\npermit 2001:db8:1::/48\npermit 0.0.0.0 0.0.0.0\n")
    decision = policy.check(request(), context(client))
    if granted_line is None:
        assert decision.code is ReplyCode.REJECTED and decision.rule is None
    else:
        assert policy.line(decision) == granted_line


def test_ipv4_rule_ignores_ipv6_and_back(tmp_path: Path) -> None:
    # ::/0 and 0.0.0.0/0 each match only their own family of clients.
    v6 = Policy(tmp_path, "permit ::/0\n")
    assert not v6.check(request(), context("10.1.2.3")).granted
    assert v6.check(request(), context("2001:db8::1")).granted


def test_non_ip_client_matches_no_rule(tmp_path: Path) -> None:
    policy = Policy(tmp_path, "permit 0.0.0.0 0.0.0.0\n")
    assert policy.check(request(), context("/run/socks.sock")).code is ReplyCode.REJECTED


def test_ipv6_destination_address(tmp_path: Path) -> None:
    policy = Policy(tmp_path, "permit 10.0.0.0/8 2001:db8::/32\n")
    name = request(hostname="v6.example.net")
    assert policy.check(name, context(addresses=("2001:db8::80",))).granted
    assert not policy.check(name, context(addresses=("192.0.2.1",))).granted


# --- SOCKS4A -----------------------------------------------------------------------

SUFFIXES = """\
deny 10.0.0.0/8 .bad.example.com
permit 10.0.0.0/8 .example.com eq 443
permit 10.0.0.0/8 192.0.2.0/24
"""


@pytest.mark.parametrize(
    "name, addresses, code, line",
    [
        ("www.example.com", ("198.51.100.1",), ReplyCode.GRANTED, 2),
        ("example.com", ("198.51.100.1",), ReplyCode.GRANTED, 2),  # the domain itself
        ("notexample.com", ("198.51.100.1",), ReplyCode.REJECTED, None),
        ("x.bad.example.com", ("192.0.2.7",), ReplyCode.REJECTED, 1),
        ("www.example.com", (), ReplyCode.GRANTED, 2),  # unresolved: suffix line applies
        ("www.example.org", (), ReplyCode.REJECTED, None),  # unresolved: address line cannot
        ("www.example.org", ("192.0.2.7",), ReplyCode.GRANTED, 3),
    ],
)
def test_suffix_rules_with_socks4a(
    tmp_path: Path, name: str, addresses: tuple[str, ...], code: ReplyCode, line: Optional[int]
) -> None:
    policy = Policy(tmp_path, SUFFIXES)
    decision = policy.check(request(443, hostname=name), context(addresses=addresses))
    assert decision.code is code, decision
    assert (policy.line(decision) if decision.rule else None) == line


def test_suffix_never_matches_a_plain_socks4_request(tmp_path: Path) -> None:
    policy = Policy(tmp_path, "permit 10.0.0.0/8 .example.com\n")
    assert not policy.check(request(443, "192.0.2.1")).granted


def test_unresolved_name_matches_any_destination_line(tmp_path: Path) -> None:
    policy = Policy(tmp_path, "deny 10.0.0.0/8 192.0.2.0/24\npermit 10.0.0.0/8 0.0.0.0 0.0.0.0\n")
    decision = policy.check(request(hostname="nowhere.invalid"), context(addresses=()))
    assert policy.line(decision) == 2 and decision.granted


def test_unresolved_name_denial_names_the_host(tmp_path: Path) -> None:
    policy = Policy(tmp_path, "permit 10.0.0.0/8 192.0.2.0/24\n")
    decision = policy.check(request(hostname="nowhere.invalid"), context(addresses=()))
    assert decision.reason == "no rule matches nowhere.invalid (unresolved)"


def test_every_resolved_address_must_be_permitted(tmp_path: Path) -> None:
    policy = Policy(tmp_path, "permit ?=n 10.0.0.0/8 192.0.2.0/24\ndeny 10.0.0.0/8 10.0.0.0/8\n")
    name = request(hostname="mixed.example.com")
    decision = policy.check(name, context(addresses=("192.0.2.5", "10.9.9.9")))
    assert decision.code is ReplyCode.REJECTED
    assert decision.rule == f"{policy.path}:2"
    assert decision.reason == f"{policy.path}:2 denies 10.9.9.9"
    missing = policy.check(name, context(addresses=("192.0.2.5", "198.51.100.1")))
    assert missing.reason == "no rule matches 198.51.100.1" and missing.rule is None


def test_first_address_line_supplies_mode_and_command(tmp_path: Path) -> None:
    policy = Policy(
        tmp_path,
        "permit ?=I 10.0.0.0/8 192.0.2.0/24 : echo first %z\npermit ?=n 10.0.0.0/8 : echo second\n",
    )
    ident = FakeIdent(NO_ANSWER)
    name = request(hostname="two.example.com")
    both = context(addresses=("198.51.100.1", "192.0.2.5"), ident=ident)
    assert policy.check(name, both).code is ReplyCode.GRANTED
    assert ident.calls == 0 and policy.commands == ["echo second"]
    reversed_ = context(addresses=("192.0.2.5", "198.51.100.1"), ident=FakeIdent(ALICE))
    assert policy.check(name, reversed_).code is ReplyCode.GRANTED
    assert policy.commands[-1] == "echo first 192.0.2.5"


def test_ruleset_evaluate_names_each_address_line() -> None:
    rules = parse_rules("permit 10.0.0.0/8 192.0.2.0/24\ndeny 0.0.0.0 0.0.0.0\n", "m.conf")
    ctx = context(addresses=("192.0.2.5", "198.51.100.1"))
    evaluation = rules.evaluate(request(hostname="a.example"), ctx)
    assert not evaluation.permitted
    assert [(a, r.lineno if r else None) for a, r in evaluation.matches] == [
        ("192.0.2.5", 1),
        ("198.51.100.1", 2),
    ]
    assert evaluation.rule is not None and evaluation.rule.location == "m.conf:2"


# --- user lists --------------------------------------------------------------------


def test_user_list_file_decides(tmp_path: Path) -> None:
    users = tmp_path / "staff.users"
    users.write_text("carol,dave\n# erin\n")
    policy = Policy(tmp_path, f"permit *={users} 10.0.0.0/8\n")
    assert policy.check(request(user="dave")).granted
    assert not policy.check(request(user="erin")).granted
    assert not policy.check(request(user="Dave")).granted  # exact, case-sensitive


def test_user_list_file_keeps_non_ascii_names_whole(tmp_path: Path) -> None:
    """UTF-8 names contain octets (0xA0, 0x85) that Latin-1 text calls blanks."""
    users = tmp_path / "intl.users"
    users.write_bytes("voilà\r\njaŅ\tbob\n".encode("utf-8"))
    policy = Policy(tmp_path, f"permit *={users} 10.0.0.0/8\n")
    wire = {name: name.encode("utf-8").decode("latin-1") for name in ("voilà", "jaŅ", "bob")}
    assert all(policy.check(request(user=user)).granted for user in wire.values())
    assert not policy.check(request(user="voil\xc3")).granted


# --- commands ----------------------------------------------------------------------


def test_expand_every_substitution() -> None:
    req = request(443, user="alice", hostname="www.example.com")
    ctx = context("10.1.2.3", addresses=("192.0.2.9", "192.0.2.10"))
    expanded = expand_command("%A %a %c %p %S %s %U %u %Z %z %% %%u", req, ctx, "alice2", 4242)
    assert expanded == "10.1.2.3 10.1.2.3 connect 4242 https 443 alice2 alice www.example.com 192.0.2.9 % %u"


def test_expand_plain_socks4_and_defaults() -> None:
    req = request(64999, "192.0.2.1", command=Command.BIND)
    expanded = expand_command("%c %S %Z %z %U", req, context("::ffff:10.1.2.3"), None, 1)
    assert expanded == "bind 64999 192.0.2.1 192.0.2.1 unknown"
    assert expand_command("%a", req, context("::ffff:10.1.2.3"), None, 1) == "10.1.2.3"


def test_expand_unresolved_name() -> None:
    req = request(hostname="nowhere.invalid")
    assert expand_command("%Z %z", req, context(addresses=()), None, 1) == "nowhere.invalid unknown"


def test_expand_leaves_unknown_sequences() -> None:
    assert expand_command("%q 100%", request(), context(), None, 1) == "%q 100%"


def test_hostile_values_are_made_shell_safe() -> None:
    req = request(user="a;rm -rf /")
    expanded = expand_command("echo %u %U", req, context(), "$(reboot)`x`|&<>'\"*?~\n", 1)
    assert expanded == "echo a_rm_-rf_/ __reboot__x" + "_" * 11
    assert sanitize("ok!@%-_=+\\:,./AZaz09") == "ok!@%-_=+\\:,./AZaz09"
    assert sanitize("é ß") == "___"


COMMANDS = """\
#NO_IDENTD: no-identd %u
#BAD_ID: bad-id %u %U
permit ?=I 10.0.0.0/8 eq 22 : strict %U
permit ?=i 10.0.0.0/8 eq 23 : lenient %U
permit ?=n 10.0.0.0/8 eq 24 : open %U
deny 10.0.0.0/8 eq 25 : never
permit ?=n 10.0.0.0/8 eq 26
"""


@pytest.mark.parametrize(
    "port, answer, code, commands",
    [
        (22, ALICE, ReplyCode.GRANTED, ["strict alice"]),
        (22, NO_ANSWER, ReplyCode.IDENTD_UNREACHABLE, ["no-identd alice"]),
        (22, MALLORY, ReplyCode.IDENT_MISMATCH, ["bad-id alice mallory"]),
        (23, NO_ANSWER, ReplyCode.GRANTED, ["no-identd alice", "lenient unknown"]),
        (23, MALLORY, ReplyCode.IDENT_MISMATCH, ["bad-id alice mallory"]),
        (24, MALLORY, ReplyCode.GRANTED, ["open unknown"]),
        (25, ALICE, ReplyCode.REJECTED, []),
        (26, ALICE, ReplyCode.GRANTED, []),
        (27, ALICE, ReplyCode.REJECTED, []),
    ],
)
def test_which_command_runs(
    tmp_path: Path, port: int, answer: IdentAnswer, code: ReplyCode, commands: list[str]
) -> None:
    policy = Policy(tmp_path, COMMANDS)
    decision = policy.check(request(port), context(ident=FakeIdent(answer)))
    assert decision.code is code
    assert policy.commands == commands


def test_without_special_lines_failed_ident_runs_nothing(tmp_path: Path) -> None:
    policy = Policy(tmp_path, "permit ?=I 10.0.0.0/8 : ok\n")
    assert policy.check(request(), context(ident=FakeIdent(NO_ANSWER))).code is ReplyCode.IDENTD_UNREACHABLE
    assert policy.check(request(), context(ident=FakeIdent(MALLORY))).code is ReplyCode.IDENT_MISMATCH
    assert policy.commands == []


def test_command_runs_with_the_server_pid(tmp_path: Path) -> None:
    policy = Policy(tmp_path, "permit 10.0.0.0/8 : kill -HUP %p\n")
    policy.check(request())
    assert policy.commands == [f"kill -HUP {os.getpid()}"]


def test_no_runner_runs_nothing(tmp_path: Path) -> None:
    path = tmp_path / "r.conf"
    path.write_text("permit 10.0.0.0/8 : echo hi\n")
    assert result(RulesPolicy(str(path)).check(request(), context())).granted


def test_a_failing_runner_does_not_change_the_decision(tmp_path: Path) -> None:
    path = tmp_path / "r.conf"
    path.write_text("permit 10.0.0.0/8 : echo hi\n")

    def broken(command: str) -> None:
        raise OSError("no /bin/sh")

    decision = result(RulesPolicy(str(path), run_command=broken).check(request(), context()))
    assert decision.granted and decision.on_granted is not None
    with capturedLogs() as events:
        decision.on_granted()
    assert [e["command"] for e in events if e.get("log_failure")] == ["echo hi"]


def test_command_on_deny_line_is_warned_about(tmp_path: Path) -> None:
    with capturedLogs() as events:
        Policy(tmp_path, "permit 10.1.0.0/16 : fine\ndeny 10.0.0.0/8 : finger @%A\n")
    warnings = [e for e in events if e.get("location")]
    assert [w["location"] for w in warnings] == [f"{tmp_path / 'sockd.conf'}:2"]
    assert warnings[0]["command"] == "finger @%A"


# --- reload ------------------------------------------------------------------------


def test_reload_keeps_old_rules_on_error(tmp_path: Path) -> None:
    policy = Policy(tmp_path, "permit 10.0.0.0/8\n")
    policy.path.write_text("permit 10.0.0.0/8\ndeny 10.0.0.0/8 eq sixty\n")
    with capturedLogs() as events:
        assert policy.policy.reload() is False
    assert policy.check(request()).granted
    (error,) = [e for e in events if "error" in e]
    assert error["path"] == str(policy.path)
    assert error["error"] == (
        f"{policy.path}:2: unknown service 'sixty'; expected a port number or a TCP service name "
        "from /etc/services"
    )


def test_reload_keeps_old_rules_when_a_user_list_vanishes(tmp_path: Path) -> None:
    users = tmp_path / "u"
    users.write_text("alice\n")
    policy = Policy(tmp_path, f"permit *={users} 10.0.0.0/8\n")
    users.unlink()
    assert policy.policy.reload() is False
    assert policy.check(request(user="alice")).granted


def test_reload_takes_new_rules_and_user_lists(tmp_path: Path) -> None:
    users = tmp_path / "u"
    users.write_text("alice\n")
    policy = Policy(tmp_path, f"permit *={users} 10.0.0.0/8\n")
    assert not policy.check(request(user="bob")).granted
    users.write_text("bob\n")
    assert policy.policy.reload() is True
    assert policy.check(request(user="bob")).granted
    assert not policy.check(request(user="alice")).granted
    policy.path.write_text("deny 10.0.0.0/8\n")
    assert policy.policy.reload() is True
    assert not policy.check(request(user="bob")).granted
    assert policy.policy.rules.rules[0].action is Action.DENY


def test_decision_under_way_keeps_its_rules(tmp_path: Path) -> None:
    policy = Policy(tmp_path, "#BAD_ID: old-bad\npermit ?=I 10.0.0.0/8 : old-ok\n")
    first, second = FakeIdent(), FakeIdent()
    pending_ok = policy.policy.check(request(), context(ident=first))
    pending_bad = policy.policy.check(request(), context(ident=second))
    policy.path.write_text("#BAD_ID: new-bad\npermit ?=I 10.0.0.0/8 : new-ok\n")
    assert policy.policy.reload() is True
    first.pending.callback(ALICE)
    granted = result(pending_ok)
    assert granted.on_granted is not None
    granted.on_granted()  # the reply 90, after the reload
    second.pending.callback(MALLORY)
    assert granted.rule == f"{policy.path}:2"
    assert result(pending_bad).code is ReplyCode.IDENT_MISMATCH
    assert policy.commands == ["old-ok", "old-bad"]


def test_constructor_raises_on_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.conf"
    path.write_text("permit 10.0.0.0/8 eq\n")
    with pytest.raises(RulesError, match=rf"^{path}:1: missing port after 'eq'"):
        RulesPolicy(str(path))


# --- the rule tester ---------------------------------------------------------------


def run_tester(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "socksident.rules", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def example_line(text: str) -> int:
    """The line number of `text` in the example file, so tests follow edits."""
    lines = (REPO / EXAMPLE).read_text().splitlines()
    (number,) = [n for n, line in enumerate(lines, 1) if line.startswith(text)]
    return number


def test_tester_permit_with_confirmed_ident() -> None:
    run = run_tester(EXAMPLE, "--src", "10.1.2.3", "--dst", "192.0.2.80:80", "--user", "alice",
                 "--ident-user", "alice")
    line = example_line("permit\t?=I 10.0.0.0 255.0.0.0")
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "request: connect from 10.1.2.3 to 192.0.2.80:80 (SOCKS4; addresses: 192.0.2.80), user 'alice'",
        f"line: {EXAMPLE}:{line}: permit\t?=I 10.0.0.0 255.0.0.0\t0.0.0.0 0.0.0.0\teq http\t"
        ": logger -p daemon.info 'socksident: %u@%a to %Z:%s'",
        "ident: identd answers 'alice'",
        f"decision: permit (90): permitted by {EXAMPLE}:{line}",
        "command: logger -p daemon.info 'socksident: alice@10.1.2.3 to 192.0.2.80:80'",
    ]


def test_tester_mismatch_shows_sanitized_bad_id_command() -> None:
    run = run_tester(EXAMPLE, "--src", "10.1.2.3", "--dst", "192.0.2.80:80", "--user", "alice",
                 "--ident-user", "a;rm -rf /")
    assert run.returncode == 1
    assert "decision: deny (93): identd names 'a;rm -rf /', request claims 'alice'\n" in run.stdout
    assert ("command: logger -p auth.warning 'socksident: 10.1.2.3 claims to be alice but identd "
            "says a_rm_-rf_/ (connect to 192.0.2.80:http)'\n") in run.stdout


def test_tester_without_ident_user_evaluates_as_no_identd() -> None:
    run = run_tester(EXAMPLE, "--src", "10.1.2.3", "--dst", "192.0.2.80:443", "--user", "alice")
    assert run.returncode == 1
    assert "evaluated as --no-identd" in run.stdout
    assert "decision: deny (92): no ident answer: no identd (tester)\n" in run.stdout
    assert "command: logger -p auth.notice" in run.stdout
    explicit = run_tester(EXAMPLE, "--src", "10.1.2.3", "--dst", "192.0.2.80:443", "--no-identd")
    assert explicit.returncode == 1 and "ident: no answer (--no-identd)\n" in explicit.stdout


def test_tester_denied_host() -> None:
    run = run_tester(EXAMPLE, "--src", "192.168.99.7", "--dst", "192.0.2.80:80")
    line = example_line("deny\t192.168.99.0")
    assert run.returncode == 1
    assert f"line: {EXAMPLE}:{line}: deny\t192.168.99.0 255.255.255.0\n" in run.stdout
    assert f"decision: deny (91): {EXAMPLE}:{line} denies 192.0.2.80\n" in run.stdout
    assert run.stdout.endswith("command: none\n") and "ident: not asked\n" in run.stdout


def test_tester_no_matching_line() -> None:
    path = "tests/../examples/sockd.conf"
    run = run_tester(path, "--src", "2001:db8:9::1", "--dst", "192.0.2.80:443")
    assert run.returncode == 1
    assert "line: none (no line matches: deny)\n" in run.stdout
    assert "decision: deny (91): no rule matches 192.0.2.80\n" in run.stdout


def test_tester_user_list_line_and_global_mode() -> None:
    staff = ["--dst", "10.9.4.4:8080", "--src", "10.1.2.3", "--ident-user", "bob"]
    assert run_tester(EXAMPLE, *staff, "--user", "bob").returncode == 0
    assert run_tester(EXAMPLE, *staff, "--user", "carol").returncode == 1  # falls to the deny line
    build = [EXAMPLE, "--src", "172.16.4.4", "--dst", "192.0.2.80:80", "--no-identd"]
    assert run_tester(*build).returncode == 0
    assert run_tester(*build, "--ident", "check").returncode == 0
    strict = run_tester(*build, "--ident", "require")
    assert strict.returncode == 1 and "decision: deny (92)" in strict.stdout


def test_tester_bind_line() -> None:
    args = [EXAMPLE, "--src", "10.1.2.3", "--dst", "192.0.2.21:21", "--no-identd"]
    bind = run_tester(*args, "--bind")
    assert bind.returncode == 0 and "request: bind from 10.1.2.3" in bind.stdout
    assert run_tester(*args).returncode == 1


def test_tester_socks4a_name() -> None:
    args = [EXAMPLE, "--src", "192.168.1.20", "--dst", "WWW.Example.com:443"]
    resolved = run_tester(*args, "--addresses", "192.0.2.1,192.0.2.2")
    line = example_line("permit\t?=n 192.168.1.0/24")
    assert resolved.returncode == 0, resolved.stdout
    assert "to www.example.com:443 (SOCKS4A; addresses: 192.0.2.1, 192.0.2.2)" in resolved.stdout
    assert f"line for 192.0.2.2: {EXAMPLE}:{line}:" in resolved.stdout
    unresolved = run_tester(*args, "--addresses", "")
    assert unresolved.returncode == 1
    assert "addresses: none, the name did not resolve" in unresolved.stdout
    assert "decision: deny (91): www.example.com does not resolve" in unresolved.stdout
    assert "ident: not asked" in unresolved.stdout
    other = run_tester(EXAMPLE, "--src", "192.168.1.20", "--dst", "www.example.org:443", "--addresses", "")
    assert other.returncode == 1


def test_tester_says_a_deny_line_command_does_not_run(tmp_path: Path) -> None:
    rules = tmp_path / "sockd.conf"
    rules.write_text("deny 0.0.0.0 0.0.0.0 : finger @%A\n")
    run = run_tester(str(rules), "--src", "10.1.2.3", "--dst", "192.0.2.1:80")
    assert run.returncode == 1
    assert run.stdout.endswith("command: none (commands on deny lines never run)\n")


def test_tester_parse_error_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "sockd.conf"
    bad.write_text("# site rules\npermit 10.0.0.0/8\ndeny 0.0.0.0 0.0.0.0 0.0.0.0 0.0.0.0 equal 80\n")
    run = run_tester(str(bad), "--src", "10.1.2.3", "--dst", "192.0.2.1:80")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == f"{bad}:3: unknown operator 'equal'; expected one of eq, neq, lt, gt, le, ge\n"


@pytest.mark.parametrize(
    "args",
    [
        ["--src", "10.1.2.3"],  # no --dst
        ["--src", "10.1.2.3", "--dst", "192.0.2.1"],  # no port
        ["--src", "10.1.2.3", "--dst", "192.0.2.1:65536"],
        ["--src", "not-an-ip", "--dst", "192.0.2.1:80"],
        ["--src", "10.1.2.3", "--dst", "bad_name!:80"],
        ["--src", "10.1.2.3", "--dst", "a.example:80", "--addresses", "x"],
        ["--src", "10.1.2.3", "--dst", "192.0.2.1:80", "--ident-user", "a", "--no-identd"],
        ["--src", "10.1.2.3", "--dst", "192.0.2.1:80", "--ident", "strict"],
    ],
)
def test_tester_usage_errors_exit_2(args: list[str]) -> None:
    run = run_tester(EXAMPLE, *args)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip()


# --- refusing before a SOCKS4A name is resolved ---------------------------------

EARLY_RULES = """\
deny 192.168.99.0/24
deny 0.0.0.0/0 10.9.0.0/16
permit *=alice 10.0.0.0/8 .example.com eq https
permit 10.0.0.0/8 10.1.0.0/16 eq http
deny 10.0.0.0/8 .example.org
permit 172.16.0.0/12
"""


@pytest.mark.parametrize(
    "client, user, hostname, port, refusal",
    [
        ("192.168.99.5", "alice", "www.example.com", 443, "t.conf:1 denies www.example.com"),
        ("203.0.113.9", "alice", "www.example.com", 443, "no rule matches www.example.com"),
        ("10.1.2.3", "alice", "www.example.com", 443, None),  # line 3 permits by name
        ("10.1.2.3", "bob", "www.example.com", 443, "no rule matches www.example.com"),
        ("10.1.2.3", "bob", "intranet.local", 80, None),  # line 4 may permit by address
        ("10.1.2.3", "bob", "www.example.org", 22, "t.conf:5 denies www.example.org"),
        ("172.16.0.9", "bob", "anything.example", 22, None),  # line 6, behind line 2's deny
    ],
)
def test_refusal_before_resolving_follows_first_match(client, user, hostname, port, refusal):
    rules = parse_rules(EARLY_RULES, "t.conf")
    asked = request(port=port, user=user, hostname=hostname)
    assert rules.refusal_before_resolving(asked, client) == refusal
    if refusal is not None:
        # Whatever the name resolves to, the full evaluation denies too.
        for addresses in [("10.1.0.1",), ("10.9.0.1",), ("192.0.2.1", "10.1.0.1")]:
            assert not rules.evaluate(asked, context(client, addresses)).permitted


def test_rules_policy_refuses_early(tmp_path: Path) -> None:
    path = tmp_path / "early.conf"
    path.write_text(EARLY_RULES)
    policy = RulesPolicy(str(path))
    asked = request(port=443, hostname="x.example.com", user="bob")
    early = policy.refuse_early(asked, context(addresses=()))
    assert early is not None and early.code is ReplyCode.REJECTED
    assert early.reason == "no rule matches x.example.com"


def test_reload_warns_about_a_command_on_a_deny_line(tmp_path: Path) -> None:
    from twisted.logger import globalLogPublisher

    path = tmp_path / "warn.conf"
    path.write_text("permit 10.0.0.0/8\n")
    policy = RulesPolicy(str(path))
    warnings: list[str] = []

    def observe(event: dict) -> None:
        if "never runs" in event.get("log_format", ""):
            warnings.append(event["location"])

    globalLogPublisher.addObserver(observe)
    try:
        path.write_text("deny 10.9.0.0/16 : echo never\npermit 10.0.0.0/8\n")
        assert policy.reload()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert warnings == [f"{path}:1"]
