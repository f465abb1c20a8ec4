"""Who may go where: the policy interface and the policy used without rules.

A policy sees the parsed request, both ends of the client's connection, the
addresses the destination resolved to, and a way to ask the client's identd.
It answers with a `Decision` that carries the reply code and the reason the
access log prints.  The rules file (`socksident.rules`) is one policy; the
no-configuration default below is another; embedders may write their own.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Union

from zope.interface import Interface, implementer

from socksident.address import ip_of
from socksident.ident import IdentAnswer, IdentOutcome
from socksident.socks4 import (
    ReplyCode,
    Request,
    RequestRejectedOrFailed,
    SOCKS4Refusal,
    refusal_for,
)

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

__all__ = [
    "PRIVATE_NETWORKS",
    "Decision",
    "DecisionResult",
    "DefaultPolicy",
    "IEarlyRefusal",
    "IPolicy",
    "IdentMode",
    "IdentVerdict",
    "PolicyContext",
    "Route",
    "check_ident",
    "deny",
    "is_loopback",
    "is_private",
    "through_next_hop",
    "verdict",
]


class Route(enum.Enum):
    """Where a permitted request goes, when the policy says (``Decision.route``).

    None (no route) is the default: connect directly, and send a SOCKS4A
    name that does not resolve here to the next hop when there is one.
    """

    NEXT_HOP = "next-hop"  # through --next-hop, even when the name resolves here
    DIRECT = "direct"  # never through the next hop: an unresolvable name is 91


def through_next_hop(
    decision: "Decision", destination: str, resolved: bool, have_next_hop: bool
) -> bool:
    """Does this granted request go through the next hop?  A name that did not
    resolve here does, unless its route is DIRECT; a NEXT_HOP route always
    does.  A route that cannot be followed raises the 91 that says why."""
    rule = decision.rule or "the policy"
    if decision.route is Route.DIRECT:
        if not resolved:
            raise RequestRejectedOrFailed(
                f"{destination} does not resolve here, and {rule} forbids the next hop"
                " (via=direct)"
            )
        return False
    if decision.route is Route.NEXT_HOP or not resolved:
        if not have_next_hop:
            if resolved or decision.route is Route.NEXT_HOP:
                raise RequestRejectedOrFailed(
                    f"{rule} sends {destination} via the next hop, but no --next-hop is set"
                )
            raise RequestRejectedOrFailed(f"{destination} does not resolve")
        return True
    return False


class IdentMode(enum.Enum):
    """How a permitted request is checked against the client's identd.

    REQUIRE is the original ``sockd -I`` (no usable answer -> 92), CHECK is
    ``sockd -i`` (no usable answer is let through), OFF asks nobody.  Both
    checking modes refuse a positive mismatch with 93.
    """

    OFF = "off"
    CHECK = "check"
    REQUIRE = "require"


@dataclass(frozen=True, slots=True)
class IdentVerdict:
    code: ReplyCode
    reason: str


def verdict(mode: IdentMode, claimed_user: str, answer: IdentAnswer) -> IdentVerdict:
    """Decide a permitted request by its ident answer, as CSTC sockd did."""
    if answer.outcome is IdentOutcome.USER:
        if answer.user_id == claimed_user:
            return IdentVerdict(ReplyCode.GRANTED, "ident confirmed user")
        return IdentVerdict(
            ReplyCode.IDENT_MISMATCH,
            f"identd names {answer.user_id!r}, request claims {claimed_user!r}",
        )
    why = answer.error or answer.outcome.value
    if mode is IdentMode.REQUIRE:
        return IdentVerdict(ReplyCode.IDENTD_UNREACHABLE, f"no ident answer: {why}")
    return IdentVerdict(ReplyCode.GRANTED, f"unverified, no ident answer: {why}")


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy's answer: the reply code to send and why.

    ``on_granted`` runs once the client has its final 90 (CONNECT: connected;
    BIND: the second reply), not when the policy permits: a rules line's
    command must not run for a request whose connect then fails.
    """

    code: ReplyCode
    reason: str
    rule: Optional[str] = None  # where the decision came from, e.g. "sockd.conf:12"
    ident: Optional[IdentAnswer] = None
    on_granted: Optional[Callable[[], object]] = field(default=None, compare=False, repr=False)
    route: Optional[Route] = None

    @property
    def granted(self) -> bool:
        return self.code is ReplyCode.GRANTED

    def refusal(self) -> Optional[SOCKS4Refusal]:
        """The refusal to raise for this decision; None when it grants."""
        return None if self.granted else refusal_for(self.code, self.reason)


@dataclass(frozen=True)
class PolicyContext:
    """Everything about one request that is not in the request itself.

    ``addresses`` are the destination's IP addresses: DSTIP for SOCKS4, what
    the name resolved to for SOCKS4A (empty when it did not resolve).  Calling
    ``ident()`` starts the ident query once; later calls share its answer.
    """

    client_host: str
    client_port: int
    server_host: str
    server_port: int
    addresses: tuple[str, ...]
    ident: Callable[[], "Deferred[IdentAnswer]"] = field(repr=False)


DecisionResult = Union[Decision, "Deferred[Decision]"]


class IPolicy(Interface):
    def check(request: Request, context: PolicyContext) -> DecisionResult:
        """Decide a request; return a Decision or a Deferred firing with one."""


class IEarlyRefusal(Interface):
    """Optional for a policy: refuse a client before its SOCKS4A name is resolved.

    Resolving costs a resolver thread and may take until the connect time
    limit; a client the policy refuses whatever the destination should not
    make the proxy resolve anything.  ``context.addresses`` is empty here.
    """

    def refuse_early(request: Request, context: PolicyContext) -> Optional[Decision]:
        """A refusal that holds for every destination, or None to go on."""


def deny(reason: str, rule: Optional[str] = None) -> Decision:
    return Decision(ReplyCode.REJECTED, reason, rule)


def check_ident(
    mode: IdentMode,
    request: Request,
    context: PolicyContext,
    reason: str,
    rule: Optional[str] = None,
) -> DecisionResult:
    """Turn a permit into the final decision by asking identd when `mode` says so.

    Policies call this once they have decided to permit, so that every policy
    answers 92 and 93 exactly alike.
    """
    if mode is IdentMode.OFF:
        return Decision(ReplyCode.GRANTED, reason, rule)

    def decide(answer: IdentAnswer) -> Decision:
        result = verdict(mode, request.user_id, answer)
        why = reason if result.code is ReplyCode.GRANTED and answer.usable else result.reason
        return Decision(result.code, why, rule, answer)

    return context.ident().addCallback(decide)


PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(net)
    for net in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "fc00::/7",
        "fe80::/10",
    )
)


def is_loopback(host: str) -> bool:
    address = ip_of(host)
    return address is not None and (address.is_loopback or address.is_unspecified)


def is_private(host: str) -> bool:
    address = ip_of(host)
    return address is not None and any(address in net for net in PRIVATE_NETWORKS)


@implementer(IPolicy, IEarlyRefusal)
class DefaultPolicy:
    """The policy with no rules file: no open relay by accident.

    Loopback clients may go anywhere; clients on private networks anywhere
    but this host's loopback; everyone else is refused.
    """

    def __init__(self, ident_mode: IdentMode = IdentMode.OFF) -> None:
        self.ident_mode = ident_mode

    def refuse_early(self, request: Request, context: PolicyContext) -> Optional[Decision]:
        if is_loopback(context.client_host) or is_private(context.client_host):
            return None
        return deny("default policy: client is not on loopback or a private network")

    def check(self, request: Request, context: PolicyContext) -> DecisionResult:
        refusal = self.refuse_early(request, context)
        if refusal is not None:
            return refusal
        if is_loopback(context.client_host):
            reason = "default policy: loopback client"
        elif any(is_loopback(a) for a in context.addresses):
            return deny("default policy: private clients may not reach the proxy's loopback")
        else:
            reason = "default policy: private-network client"
        return check_ident(self.ident_mode, request, context, reason)
