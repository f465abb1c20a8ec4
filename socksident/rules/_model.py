"""The rules' data: one parsed line (`Rule`), a whole file (`RuleSet`), and
first-match evaluation against a request (`Evaluation`)."""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

from socksident.address import IPAddress, ip_of
from socksident.policy import Decision, IdentMode, PolicyContext, Route
from socksident.socks4 import Command, ReplyCode, Request

__all__ = [
    "OPERATORS",
    "Action",
    "AddressMask",
    "Destination",
    "DomainSuffix",
    "Evaluation",
    "PortTest",
    "Rule",
    "RuleSet",
    "host_address",
]

OPERATORS: dict[str, Callable[[int, int], bool]] = {
    "eq": operator.eq,
    "neq": operator.ne,
    "lt": operator.lt,
    "gt": operator.gt,
    "le": operator.le,
    "ge": operator.ge,
}


class Action(enum.Enum):
    PERMIT = "permit"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class AddressMask:
    """``addr mask`` or CIDR: matches when the masked bits are equal."""

    version: int
    address: int
    mask: int

    def matches(self, ip: Optional[IPAddress]) -> bool:
        if ip is None or ip.version != self.version:
            return False
        return (int(ip) & self.mask) == (self.address & self.mask)


@dataclass(frozen=True, slots=True)
class DomainSuffix:
    """``.example.com``: SOCKS4A names in that domain, and the domain itself."""

    suffix: str  # lower case, with its leading dot

    def matches(self, hostname: Optional[str]) -> bool:
        if hostname is None:
            return False
        return hostname == self.suffix[1:] or hostname.endswith(self.suffix)


@dataclass(frozen=True, slots=True)
class PortTest:
    """``op port``, e.g. ``ge 1024``."""

    op: str
    port: int

    def matches(self, port: int) -> bool:
        return OPERATORS[self.op](port, self.port)


Destination = Union[AddressMask, DomainSuffix, None]  # None: any destination


@dataclass(frozen=True, slots=True)
class Rule:
    """One parsed rule line; ``text`` is the line as written."""

    filename: str
    lineno: int
    text: str
    action: Action
    source: AddressMask
    destination: Destination = None
    port: Optional[PortTest] = None
    users: Optional[frozenset[str]] = None
    ident_mode: Optional[IdentMode] = None  # None: the global mode
    socks_command: Optional[Command] = None  # None: connect and bind
    shell_command: Optional[str] = None
    route: Optional[Route] = None  # via=next-hop / via=direct; None: the default

    @property
    def location(self) -> str:
        return f"{self.filename}:{self.lineno}"

    @property
    def permits(self) -> bool:
        return self.action is Action.PERMIT

    def matches(
        self,
        request: Request,
        client: Optional[IPAddress],
        address: Optional[IPAddress],
    ) -> bool:
        """Does this line apply to `request` from `client` going to `address`?

        `address` is one resolved destination address, or None when a
        SOCKS4A name did not resolve.
        """
        return self.applies_to(request, client) and self._destination_matches(request, address)

    def applies_to(self, request: Request, client: Optional[IPAddress]) -> bool:
        """Everything but the destination: command, users, client and port."""
        return (
            (self.socks_command is None or self.socks_command is request.command)
            and (self.users is None or request.user_id in self.users)
            and self.source.matches(client)
            and (self.port is None or self.port.matches(request.port))
        )

    def _destination_matches(self, request: Request, address: Optional[IPAddress]) -> bool:
        if self.destination is None:
            return True
        if isinstance(self.destination, DomainSuffix):
            return self.destination.matches(request.hostname)
        return self.destination.matches(address)


@dataclass(frozen=True, slots=True)
class Evaluation:
    """The rules' verdict before any ident query.

    ``rule`` is the line that decided: the first address's line when
    permitted, else the denying line (None when no line matched).
    ``matches`` pairs each evaluated address (None: unresolved name) with
    its first matching line.
    """

    permitted: bool
    reason: str
    rule: Optional[Rule]
    matches: tuple[tuple[Optional[str], Optional[Rule]], ...] = ()


@dataclass(frozen=True, slots=True)
class RuleSet:
    """A whole rules file: its lines in order and the two special commands."""

    filename: str
    rules: tuple[Rule, ...]
    no_identd_command: Optional[str] = None
    bad_id_command: Optional[str] = None

    def _first_match(
        self, request: Request, client: Optional[IPAddress], target: Optional[IPAddress]
    ) -> Optional[Rule]:
        return next((r for r in self.rules if r.matches(request, client, target)), None)

    def evaluate(self, request: Request, context: PolicyContext) -> Evaluation:
        """Match every destination address; all must be permitted."""
        client = host_address(context.client_host)
        addresses: Sequence[Optional[str]] = context.addresses or (None,)
        matches = tuple(
            (address, self._first_match(request, client, host_address(address)))
            for address in addresses
        )
        return _verdict(request, matches)

    def refusal_before_resolving(self, request: Request, client_host: str) -> Optional[str]:
        """Why `request` is refused whatever its name resolves to, or None.

        Walks the lines as first-match would.  A line that matches by
        address may deny some addresses, but never permits one the later
        lines would not look at, so only a permitting address line leaves
        the question open.
        """
        client = host_address(client_host)
        for rule in self.rules:
            if not rule.applies_to(request, client):
                continue
            if isinstance(rule.destination, AddressMask):
                if rule.permits:
                    return None
                continue
            if rule._destination_matches(request, None):
                return None if rule.permits else f"{rule.location} denies {request.destination}"
        return f"no rule matches {request.destination}"

    def commands_for(self, decision: Decision) -> tuple[str, ...]:
        """The special commands to run once ident spoke: ``#NO_IDENTD`` when
        the answer was not usable, ``#BAD_ID`` on a mismatch (93).  A line's
        own command waits for the reply 90 (`RulesPolicy`)."""
        templates = []
        if decision.ident is not None and not decision.ident.usable:
            templates.append(self.no_identd_command)
        if decision.code is ReplyCode.IDENT_MISMATCH:
            templates.append(self.bad_id_command)
        return tuple(t for t in templates if t)


def _verdict(
    request: Request, matches: tuple[tuple[Optional[str], Optional[Rule]], ...]
) -> Evaluation:
    for address, rule in matches:
        label = address if address is not None else f"{request.destination} (unresolved)"
        if rule is None:
            return Evaluation(False, f"no rule matches {label}", None, matches)
        if not rule.permits:
            return Evaluation(False, f"{rule.location} denies {label}", rule, matches)
    first = matches[0][1]
    assert first is not None
    return Evaluation(True, f"permitted by {first.location}", first, matches)


def host_address(text: Optional[str]) -> Optional[IPAddress]:
    """The IP in `text` (IPv4-mapped as IPv4), None for a non-IP peer (UNIX socket)."""
    return None if text is None else ip_of(text)
