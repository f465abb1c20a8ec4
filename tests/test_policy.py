"""The policy module: the ident verdict, and the default policy (loopback anywhere,
private ranges anywhere but our loopback)."""

import pytest
from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from socksident.ident import IdentAnswer, IdentOutcome, parse_response
from socksident.policy import (
    Decision,
    DefaultPolicy,
    IdentMode,
    IEarlyRefusal,
    IPolicy,
    PolicyContext,
    verdict,
)
from socksident.socks4 import (
    Command,
    IdentdMismatch,
    IdentdUnreachable,
    ReplyCode,
    Request,
    RequestRejectedOrFailed,
)


def user(user_id: str, opsys: str = "UNIX") -> IdentAnswer:
    return IdentAnswer(IdentOutcome.USER, user_id=user_id, opsys=opsys)


def parse(line: bytes) -> IdentAnswer:
    return parse_response(line, 6191, 23)


def never_asked() -> "Deferred[IdentAnswer]":
    raise AssertionError("the default policy without --ident asks no identd")


def decide(client: str, *addresses: str) -> Decision:
    context = PolicyContext(client, 5000, "10.0.0.1", 1080, addresses, never_asked)
    decision = DefaultPolicy().check(Request(Command.CONNECT, 80, "192.0.2.7", "u"), context)
    assert isinstance(decision, Decision)
    return decision


@pytest.mark.parametrize(
    "client",
    [
        "10.0.0.0", "10.255.255.255", "172.16.0.1", "172.31.255.255", "192.168.0.1",
        "192.168.255.254", "169.254.1.1", "fc00::1", "fdff:ffff::1", "fe80::1",
        "fe80::1%eth0", "::ffff:192.168.1.9",
    ],
)
def test_private_clients_may_connect_out(client):
    assert decide(client, "192.0.2.7").granted


@pytest.mark.parametrize("client", ["127.0.0.1", "127.255.0.9", "::1", "::ffff:127.0.0.1"])
def test_loopback_clients_may_go_anywhere_even_our_loopback(client):
    assert decide(client, "127.0.0.1").granted


@pytest.mark.parametrize(
    "client",
    [
        "172.15.255.255", "172.32.0.0", "192.169.0.1", "169.255.0.1", "11.0.0.1",
        "9.255.255.255", "203.0.113.5", "2001:db8::1", "fec0::1", "fbff::1",
    ],
)
def test_every_other_client_is_refused(client):
    decision = decide(client, "192.0.2.7")
    assert decision.code is ReplyCode.REJECTED
    assert "not on loopback or a private network" in decision.reason


@pytest.mark.parametrize(
    "addresses",
    [("127.0.0.1",), ("::1",), ("192.0.2.9", "127.0.0.1"), ("192.0.2.9", "::1"), ("127.1.2.3",)],
)
def test_private_clients_may_not_reach_our_loopback_by_any_address(addresses):
    decision = decide("192.168.1.20", *addresses)
    assert decision.code is ReplyCode.REJECTED
    assert "loopback" in decision.reason


# verdict: each mode by each outcome

NO_ANSWER = IdentAnswer(IdentOutcome.NO_ANSWER, error="connection refused")
ERROR = IdentAnswer(IdentOutcome.ERROR, error="HIDDEN-USER")
ROOT = user("root")


@pytest.mark.parametrize(
    "mode, answer, code",
    [
        (IdentMode.REQUIRE, ROOT, ReplyCode.GRANTED),
        (IdentMode.CHECK, ROOT, ReplyCode.GRANTED),
        (IdentMode.OFF, ROOT, ReplyCode.GRANTED),
        (IdentMode.REQUIRE, user("Root"), ReplyCode.IDENT_MISMATCH),
        (IdentMode.CHECK, user("Root"), ReplyCode.IDENT_MISMATCH),
        (IdentMode.OFF, user("Root"), ReplyCode.IDENT_MISMATCH),
        (IdentMode.REQUIRE, user("root "), ReplyCode.IDENT_MISMATCH),
        (IdentMode.REQUIRE, ERROR, ReplyCode.IDENTD_UNREACHABLE),
        (IdentMode.CHECK, ERROR, ReplyCode.GRANTED),
        (IdentMode.OFF, ERROR, ReplyCode.GRANTED),
        (IdentMode.REQUIRE, NO_ANSWER, ReplyCode.IDENTD_UNREACHABLE),
        (IdentMode.CHECK, NO_ANSWER, ReplyCode.GRANTED),
        (IdentMode.OFF, NO_ANSWER, ReplyCode.GRANTED),
    ],
)
def test_verdict(mode: IdentMode, answer: IdentAnswer, code: ReplyCode) -> None:
    assert verdict(mode, "root", answer).code is code


def test_verdict_mismatch_names_both_users() -> None:
    result = verdict(IdentMode.CHECK, "root", user("Root"))
    assert "'Root'" in result.reason and "'root'" in result.reason


@pytest.mark.parametrize("mode", [IdentMode.REQUIRE, IdentMode.CHECK])
@pytest.mark.parametrize("answer", [ERROR, NO_ANSWER])
def test_verdict_reason_says_why_there_was_no_answer(
    mode: IdentMode, answer: IdentAnswer
) -> None:
    assert answer.error is not None
    assert answer.error in verdict(mode, "root", answer).reason


def test_verdict_compares_latin1_user_ids_exactly() -> None:
    answer = parse(b"6191 , 23 : USERID : UNIX : j\xf6rg")
    assert verdict(IdentMode.REQUIRE, "j\xf6rg", answer).code is ReplyCode.GRANTED
    assert verdict(IdentMode.REQUIRE, "jorg", answer).code is ReplyCode.IDENT_MISMATCH


# -- Decision.refusal and the interfaces --------------------------------------


def test_a_granting_decision_has_no_refusal():
    assert Decision(ReplyCode.GRANTED, "ok").refusal() is None


@pytest.mark.parametrize(
    "code, cls",
    [
        (ReplyCode.REJECTED, RequestRejectedOrFailed),
        (ReplyCode.IDENTD_UNREACHABLE, IdentdUnreachable),
        (ReplyCode.IDENT_MISMATCH, IdentdMismatch),
    ],
)
def test_a_refusing_decision_names_its_refusal(code, cls):
    refusal = Decision(code, "the reason").refusal()
    assert type(refusal) is cls and refusal.reason == "the reason"


def test_on_granted_does_not_take_part_in_equality():
    assert Decision(ReplyCode.GRANTED, "ok", on_granted=lambda: None) == Decision(
        ReplyCode.GRANTED, "ok"
    )


def test_both_built_in_policies_provide_their_interfaces(tmp_path):
    from socksident.rules import RulesPolicy

    path = tmp_path / "sockd.conf"
    path.write_text("permit 10.0.0.0/8\n")
    for policy in (DefaultPolicy(), RulesPolicy(str(path))):
        assert verifyObject(IPolicy, policy)
        assert verifyObject(IEarlyRefusal, policy)



@pytest.mark.parametrize("mode", [IdentMode.REQUIRE, IdentMode.CHECK])
def test_verdict_reason_for_a_confirmed_user(mode: IdentMode) -> None:
    assert verdict(mode, "root", user("root")).reason == "ident confirmed user"


@pytest.mark.parametrize(
    "client, addresses, reason",
    [
        ("127.0.0.1", ("192.0.2.7",), "default policy: loopback client"),
        ("10.0.0.9", ("192.0.2.7",), "default policy: private-network client"),
        ("10.0.0.9", ("127.0.0.1",),
         "default policy: private clients may not reach the proxy's loopback"),
    ],
)
def test_default_policy_says_which_rule_decided(client, addresses, reason):
    assert decide(client, *addresses).reason == reason


def decide_with_ident(mode: IdentMode, request_user: str, answer: IdentAnswer) -> Decision:
    from socksident.policy import check_ident
    from twisted.internet.defer import succeed

    context = PolicyContext("10.0.0.9", 5000, "10.0.0.1", 1080, ("192.0.2.7",),
                            lambda: succeed(answer))
    decisions: list = []
    result = check_ident(mode, Request(Command.CONNECT, 80, "192.0.2.7", request_user),
                         context, "rule 3 permits", "rule 3")
    if isinstance(result, Decision):
        return result
    result.addCallback(decisions.append)
    [decision] = decisions
    return decision


def test_check_ident_off_keeps_the_policys_reason():
    decision = decide_with_ident(IdentMode.OFF, "root", user("root"))
    assert (decision.code, decision.reason, decision.rule) == (
        ReplyCode.GRANTED, "rule 3 permits", "rule 3")


@pytest.mark.parametrize("mode", [IdentMode.REQUIRE, IdentMode.CHECK])
def test_check_ident_confirmed_keeps_the_policys_reason(mode):
    decision = decide_with_ident(mode, "root", user("root"))
    assert (decision.code, decision.reason) == (ReplyCode.GRANTED, "rule 3 permits")


@pytest.mark.parametrize("mode", [IdentMode.REQUIRE, IdentMode.CHECK])
def test_check_ident_mismatch_gives_the_verdicts_reason(mode):
    answer = user("Root")
    decision = decide_with_ident(mode, "root", answer)
    assert decision.code is ReplyCode.IDENT_MISMATCH
    assert decision.reason == verdict(mode, "root", answer).reason


def test_check_ident_granted_without_an_answer_gives_the_verdicts_reason():
    answer = IdentAnswer(IdentOutcome.NO_ANSWER, error="timed out")
    decision = decide_with_ident(IdentMode.CHECK, "root", answer)
    assert decision.code is ReplyCode.GRANTED
    assert decision.reason == verdict(IdentMode.CHECK, "root", answer).reason
    assert decision.reason != "rule 3 permits"


def test_default_policy_names_why_a_public_client_is_refused():
    assert decide("192.0.2.9", "192.0.2.7").reason == (
        "default policy: client is not on loopback or a private network")
