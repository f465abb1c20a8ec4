"""The default policy: loopback anywhere, private ranges anywhere but our loopback."""

import pytest
from twisted.internet.defer import Deferred

from socksident.ident import IdentAnswer
from socksident.policy import Decision, DefaultPolicy, PolicyContext
from socksident.socks4 import Command, ReplyCode, Request


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
