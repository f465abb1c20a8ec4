"""The rules file: classic CSTC ``sockd.conf`` lines, parsed and decided.

One rule a line, the first matching line wins, no matching line denies (91)::

    permit|deny [connect|bind] [?=I|?=i|?=n] [*=userlist] src_addr src_mask
                [dst_addr dst_mask] [op dst_port] [: command]

``#`` starts a comment, except on the two special lines ``#NO_IDENTD: cmd``
and ``#BAD_ID: cmd`` (they must start in the first column; the last one of
each kind wins).  Lines are at most 1023 characters.  Addresses match as
``(addr & mask) == (rule_addr & mask)``, so classic non-contiguous masks
work.  ``op`` is one of eq, neq, lt, gt, le, ge with a port number or a TCP
service name.  ``*=`` takes comma-separated user ids and absolute file names
(entries starting with ``/``) of files holding user ids (whitespace or comma
separated, ``#`` comments); they are matched exactly against the request's
USERID, byte for byte (the rules file is read as UTF-8, list files and
USERIDs as raw octets).  ``?=I``/``?=i``/``?=n`` override the global ident
mode (require/check/off) for that line; identd is asked only when the
matching line permits and its mode is not off.

Commands: ``: cmd`` runs when the final decision is 90; ``#NO_IDENTD`` when
a permitting line's ident query got no usable answer (in check mode both
it and the line's command run, in that order); ``#BAD_ID`` on a mismatch
(93).  A command written on a deny line is accepted for compatibility with
old files but never runs; `RulesPolicy` logs a warning for it at load time.
See `expand_command` for the ``%`` substitutions.

Extensions to the classic format:

- CIDR (``10.0.0.0/8``) wherever an address and mask go, as one field.
- IPv6 networks in CIDR form (``2001:db8::/32``).  An IPv6 rule never
  matches an IPv4 address and vice versa; IPv4-mapped IPv6 clients
  (``::ffff:10.1.2.3``) are matched as IPv4.  So ``0.0.0.0 0.0.0.0`` as a
  *source* matches every IPv4 client and no IPv6 one.
- ``connect`` or ``bind`` right after the action limits a line to that
  SOCKS command.
- A destination written as a domain suffix (``.example.com``, one field)
  matches SOCKS4A host names ending in it, and ``example.com`` itself.  It
  never matches a plain SOCKS4 request: we do no reverse lookups.
- A destination whose IPv4 mask is zero (``0.0.0.0 0.0.0.0``,
  ``0.0.0.0/0``) matches any destination, as an omitted one does, including
  IPv6 addresses and SOCKS4A names that did not resolve.

SOCKS4A: the rules are evaluated once per resolved address
(``PolicyContext.addresses``); the request is permitted only when every
address's first matching line permits, so a name cannot smuggle a denied
address in beside a permitted one.  The first address's line supplies the
ident mode and the commands.  A name that did not resolve is evaluated once
with no address: only lines with a suffix or an any/omitted destination can
match it.

Run ``python -m socksident.rules FILE --src IP --dst HOST:PORT ...`` to see
which line a request matches (see `main`).
"""

from __future__ import annotations

import argparse
import enum
import ipaddress
import operator
import os
import re
import socket
import sys
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

from twisted.logger import Logger
from zope.interface import implementer

from socksident.address import IPAddress, ip_of
from socksident.ident import IdentAnswer, IdentMode, IdentOutcome
from socksident.policy import (
    Decision,
    DecisionResult,
    IEarlyRefusal,
    IPolicy,
    PolicyContext,
    check_ident,
    deny,
)
from socksident.socks4 import (
    Command,
    ProtocolError,
    ReplyCode,
    Request,
    RequestParser,
    build_request,
    is_valid_hostname,
)

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

log = Logger()


#: Longest line the classic sockd read (its buffer held 1024 with the newline).
MAX_LINE_LENGTH = 1023

OPERATORS: dict[str, Callable[[int, int], bool]] = {
    "eq": operator.eq,
    "neq": operator.ne,
    "lt": operator.lt,
    "gt": operator.gt,
    "le": operator.le,
    "ge": operator.ge,
}
IDENT_OPTIONS = {"?=I": IdentMode.REQUIRE, "?=i": IdentMode.CHECK, "?=n": IdentMode.OFF}
SOCKS_COMMANDS = {"connect": Command.CONNECT, "bind": Command.BIND}
NO_IDENTD = "#NO_IDENTD:"
BAD_ID = "#BAD_ID:"
SUBSTITUTIONS = "AacpSsUuZz%"

_OPERATOR_LIST = ", ".join(OPERATORS)
_NUMBER = re.compile(r"[0-9]+")
_WORD = re.compile(r"\S+")
# A word that is an IPv6 address or network (at least two colons), so that
# its colons are not taken for the ': command' separator.
_IPV6_WORD = re.compile(r"[0-9A-Fa-f.]*:[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*(/[0-9]*)?")
_LIST_SEPARATORS = re.compile(rb"[ \t\r\v\f,]+")
_UNSAFE = re.compile(r"[^0-9A-Za-z!@%\-_=+\\:,./]")
_PERCENT = re.compile(r"%(.)", re.DOTALL)


class RulesError(Exception):
    """A rules file that cannot be used; the message starts with FILE:LINE."""


class _LineError(Exception):
    """What is wrong with one line; `parse_rules` adds FILE:LINE."""


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
        client = _host_address(context.client_host)
        addresses: Sequence[Optional[str]] = context.addresses or (None,)
        matches = tuple(
            (address, self._first_match(request, client, _host_address(address)))
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
        client = _host_address(client_host)
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

    def commands_for(self, rule: Rule, decision: Decision) -> tuple[str, ...]:
        """The command templates to run once `rule` permitted and ident spoke."""
        templates = []
        if decision.ident is not None and not decision.ident.usable:
            templates.append(self.no_identd_command)
        if decision.code is ReplyCode.IDENT_MISMATCH:
            templates.append(self.bad_id_command)
        if decision.granted:
            templates.append(rule.shell_command)
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


def _host_address(text: Optional[str]) -> Optional[IPAddress]:
    """The IP in `text` (IPv4-mapped as IPv4), None for a non-IP peer (UNIX socket)."""
    return None if text is None else ip_of(text)


# --- parsing -----------------------------------------------------------------


def load_rules(path: str) -> RuleSet:
    """Read and parse a rules file (and the user-list files it names)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise RulesError(f"{path}: cannot read the rules file: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw[: e.start].count(b"\n") + 1
        raise RulesError(f"{path}:{lineno}: not UTF-8; expected a UTF-8 text file") from None
    return parse_rules(text, path)


def parse_rules(text: str, filename: str = "<rules>") -> RuleSet:
    """Parse rules text; `filename` is used in messages and `Rule.location`."""
    rules: list[Rule] = []
    special: dict[str, Optional[str]] = {NO_IDENTD: None, BAD_ID: None}
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        try:
            if len(line) > MAX_LINE_LENGTH:
                raise _LineError(
                    f"line is {len(line)} characters long; expected at most {MAX_LINE_LENGTH}"
                )
            prefix = next((p for p in special if line.startswith(p)), None)
            if prefix is not None:
                special[prefix] = _parse_special(line, prefix)
                continue
            rule = _parse_line(line, filename, lineno)
        except _LineError as e:
            raise RulesError(f"{filename}:{lineno}: {e}") from None
        if rule is not None:
            rules.append(rule)
    return RuleSet(filename, tuple(rules), special[NO_IDENTD], special[BAD_ID])


def _parse_special(line: str, prefix: str) -> str:
    command = line[len(prefix) :].strip()
    if not command:
        raise _LineError(f"empty command after {prefix!r}; expected a shell command")
    _check_template(command)
    return command


def _parse_line(line: str, filename: str, lineno: int) -> Optional[Rule]:
    body = line.split("#", 1)[0]
    fields, shell_command = _split_command(body)
    words = deque(fields.split())
    if not words:
        if shell_command is not None:
            raise _LineError("a command without a rule; expected 'permit|deny ... : command'")
        return None
    action = _parse_action(words.popleft())
    socks_command = _parse_socks_command(words)
    ident_mode, users = _parse_options(words)
    source = _parse_source(words)
    destination = _parse_destination(words)
    port = _parse_port(words)
    if words:
        raise _LineError(
            f"unexpected {words[0]!r} after the port; expected ': command' or the end of the line"
        )
    return Rule(
        filename,
        lineno,
        line.strip(),
        action,
        source,
        destination,
        port,
        users,
        ident_mode,
        socks_command,
        shell_command,
    )


def _split_command(body: str) -> tuple[str, Optional[str]]:
    """Split at the first ':' that is not inside an IPv6 address."""
    for word in _WORD.finditer(body):
        text = word.group()
        if ":" in text and not _IPV6_WORD.fullmatch(text):
            at = word.start() + text.index(":")
            command = body[at + 1 :].strip()
            if not command:
                raise _LineError("empty command after ':'; expected a shell command")
            _check_template(command)
            return body[:at], command
    return body, None


def _check_template(command: str) -> None:
    for match in _PERCENT.finditer(command):
        if match.group(1) not in SUBSTITUTIONS:
            raise _LineError(
                f"unknown substitution {match.group()!r} in the command; expected one of "
                + " ".join("%" + c for c in SUBSTITUTIONS)
            )
    if _PERCENT.sub("", command).endswith("%"):
        raise _LineError("a lone '%' ends the command; write '%%' for a percent sign")


def _parse_action(word: str) -> Action:
    try:
        return Action(word)
    except ValueError:
        raise _LineError(f"unknown action {word!r}; expected permit or deny") from None


def _parse_socks_command(words: deque[str]) -> Optional[Command]:
    """The optional ``connect``/``bind`` word (an extension)."""
    if words and words[0] in SOCKS_COMMANDS:
        return SOCKS_COMMANDS[words.popleft()]
    return None


def _parse_options(words: deque[str]) -> tuple[Optional[IdentMode], Optional[frozenset[str]]]:
    """The optional ``?=`` and ``*=`` fields, in either order, each at most once."""
    ident_mode: Optional[IdentMode] = None
    users: Optional[frozenset[str]] = None
    while words and words[0][:2] in ("?=", "*="):
        word = words.popleft()
        if word.startswith("?="):
            if ident_mode is not None:
                raise _LineError(f"second ident option {word!r}; expected at most one ?=")
            if word not in IDENT_OPTIONS:
                raise _LineError(f"unknown ident option {word!r}; expected ?=I, ?=i or ?=n")
            ident_mode = IDENT_OPTIONS[word]
        else:
            if users is not None:
                raise _LineError(f"second user list {word!r}; expected at most one *=")
            users = _parse_users(word[2:])
    return ident_mode, users


def _parse_users(value: str) -> frozenset[str]:
    entries = value.split(",")
    if not value or not all(entries):
        raise _LineError(
            f"empty entry in user list {'*=' + value!r}; "
            "expected user ids or absolute file names separated by commas"
        )
    users: set[str] = set()
    for entry in entries:
        if entry.startswith("/"):
            users |= _read_user_list(entry)
        else:
            users.add(_wire_user(entry))
    return frozenset(users)


def _read_user_list(path: str) -> frozenset[str]:
    """User ids from a list file, kept as raw octets (Latin-1) like USERIDs."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise _LineError(
            f"cannot read user list {path!r}: {e.strerror}; expected a readable file of user ids"
        ) from None
    # Split the octets, not decoded text: Latin-1 text would take bytes such
    # as 0x85 and 0xA0 (inside UTF-8 names) for line breaks and blanks.
    users: set[str] = set()
    for line in raw.split(b"\n"):
        entries = _LIST_SEPARATORS.split(line.split(b"#", 1)[0])
        users.update(entry.decode("latin-1") for entry in entries if entry)
    return frozenset(users)


def _wire_user(text: str) -> str:
    """A user id typed in UTF-8 (rules file, argv), as its octets decode in a Request."""
    return text.encode("utf-8", "surrogateescape").decode("latin-1")


def _parse_source(words: deque[str]) -> AddressMask:
    if not words:
        raise _LineError(
            "missing source address; expected 'src_addr src_mask' or CIDR such as 10.0.0.0/8"
        )
    return _parse_address_mask(words, "source")


def _parse_destination(words: deque[str]) -> Destination:
    if not words or words[0] in OPERATORS:
        return None
    word = words[0]
    if word.startswith("."):
        words.popleft()
        return _parse_suffix(word)
    if _NUMBER.fullmatch(word):
        raise _LineError(
            f"port {word!r} without an operator; "
            f"expected 'eq {word}' or another of {_OPERATOR_LIST}"
        )
    if word.isalpha():
        raise _LineError(f"unknown operator {word!r}; expected one of {_OPERATOR_LIST}")
    destination = _parse_address_mask(words, "destination")
    if destination.version == 4 and destination.mask == 0:
        return None
    return destination


def _parse_address_mask(words: deque[str], what: str) -> AddressMask:
    word = words.popleft()
    if "/" in word:
        return _parse_cidr(word, what)
    address = _parse_ipv4(word, f"{what} address")
    if not words:
        raise _LineError(
            f"missing {what} mask after {word!r}; expected a dotted mask such as "
            f"255.255.255.0, or CIDR such as {word}/24"
        )
    mask = _parse_ipv4(words.popleft(), f"{what} mask")
    return AddressMask(4, address, mask)


def _parse_ipv4(word: str, what: str) -> int:
    if ":" in word:
        raise _LineError(f"IPv6 {what} {word!r} needs CIDR form; expected e.g. {word}/128")
    try:
        return int(ipaddress.IPv4Address(word))
    except ValueError:
        raise _LineError(
            f"invalid {what} {word!r}; expected a dotted IPv4 address such as 192.168.1.0"
        ) from None


def _parse_cidr(word: str, what: str) -> AddressMask:
    try:
        network = ipaddress.ip_network(word, strict=False)
    except ValueError:
        raise _LineError(
            f"invalid {what} network {word!r}; expected CIDR such as 10.0.0.0/8 or 2001:db8::/32"
        ) from None
    return AddressMask(network.version, int(network.network_address), int(network.netmask))


def _parse_suffix(word: str) -> DomainSuffix:
    name = word[1:].rstrip(".").lower()
    if not (name.isascii() and is_valid_hostname(name.encode("ascii"))):
        raise _LineError(f"invalid domain suffix {word!r}; expected a name such as .example.com")
    return DomainSuffix("." + name)


def _parse_port(words: deque[str]) -> Optional[PortTest]:
    if not words:
        return None
    op = words.popleft()
    if op not in OPERATORS:
        raise _LineError(f"unknown operator {op!r}; expected one of {_OPERATOR_LIST}")
    if not words:
        raise _LineError(
            f"missing port after {op!r}; expected a port number or a service name such as http"
        )
    return PortTest(op, _parse_port_number(words.popleft()))


def _parse_port_number(word: str) -> int:
    if _NUMBER.fullmatch(word):
        port = int(word)
        if port > 65535:
            raise _LineError(f"port {word} out of range; expected 0-65535")
        return port
    try:
        return socket.getservbyname(word, "tcp")
    except OSError:
        raise _LineError(
            f"unknown service {word!r}; "
            "expected a port number or a TCP service name from /etc/services"
        ) from None


# --- commands ----------------------------------------------------------------


def sanitize(value: str) -> str:
    """Map every character a shell could misread to '_' (the classic set)."""
    return _UNSAFE.sub("_", value)


def expand_command(
    template: str,
    request: Request,
    context: PolicyContext,
    ident_user: Optional[str],
    pid: int,
) -> str:
    """Fill in a command's ``%`` substitutions, each value made shell-safe.

    %A client name (we do no reverse lookups: the client IP), %a client IP,
    %c connect|bind, %p the server's pid, %S service name of the port (or
    the number), %s port number, %U user id from identd (or 'unknown'),
    %u user id the client claimed, %Z destination name (SOCKS4A host name,
    else IP), %z destination IP, %% a percent.  Unknown ones stay as written.
    """
    client = _host_address(context.client_host)
    client_ip = str(client) if client is not None else context.client_host
    dst_ip = _destination_ip(request, context)
    values = {
        "A": client_ip,
        "a": client_ip,
        "c": request.command.name.lower(),
        "p": str(pid),
        "S": _service_name(request.port),
        "s": str(request.port),
        "U": ident_user if ident_user is not None else "unknown",
        "u": request.user_id,
        "Z": request.hostname if request.hostname is not None else dst_ip,
        "z": dst_ip,
    }
    safe = {key: sanitize(value) for key, value in values.items()}
    safe["%"] = "%"
    return _PERCENT.sub(lambda m: safe.get(m.group(1), m.group()), template)


def _destination_ip(request: Request, context: PolicyContext) -> str:
    if context.addresses:
        return context.addresses[0]
    return "unknown" if request.is_socks4a else request.address


def _service_name(port: int) -> str:
    try:
        return socket.getservbyport(port, "tcp")
    except OSError:
        return str(port)


# --- the policy --------------------------------------------------------------


@implementer(IPolicy, IEarlyRefusal)
class RulesPolicy:
    """The policy of a rules file, reloadable (e.g. on SIGHUP).

    Each check works on the rule set current when it starts, so a reload
    never changes a decision already under way.  `run_command` receives each
    expanded command (twistd passes a `socksident.commands.CommandRunner`);
    None runs nothing.
    """

    def __init__(
        self,
        path: str,
        ident_mode: IdentMode = IdentMode.OFF,
        run_command: Optional[Callable[[str], object]] = None,
    ) -> None:
        self.path = path
        self.ident_mode = ident_mode
        self._run_command = run_command
        self._rules = load_rules(path)
        _warn_unrun_commands(self._rules)

    @property
    def rules(self) -> RuleSet:
        return self._rules

    def reload(self) -> bool:
        """Re-read the rules and user lists; on error keep the old rules."""
        try:
            rules = load_rules(self.path)
        except RulesError as e:
            log.error(
                "rules reload failed, keeping the old rules: {error}",
                path=self.path,
                error=str(e),
            )
            return False
        self._rules = rules
        _warn_unrun_commands(rules)
        log.info(
            "rules reloaded from {path}: {count} lines", path=self.path, count=len(rules.rules)
        )
        return True

    def refuse_early(self, request: Request, context: PolicyContext) -> Optional[Decision]:
        reason = self._rules.refusal_before_resolving(request, context.client_host)
        return None if reason is None else deny(reason)

    def check(self, request: Request, context: PolicyContext) -> DecisionResult:
        rules = self._rules
        evaluation = rules.evaluate(request, context)
        rule = evaluation.rule
        if not evaluation.permitted or rule is None:
            return deny(evaluation.reason, rule.location if rule is not None else None)
        mode = rule.ident_mode if rule.ident_mode is not None else self.ident_mode
        result = check_ident(mode, request, context, evaluation.reason, rule.location)
        if isinstance(result, Decision):
            return self._run_commands(result, rules, rule, request, context)
        return result.addCallback(self._run_commands, rules, rule, request, context)

    def _run_commands(
        self,
        decision: Decision,
        rules: RuleSet,
        rule: Rule,
        request: Request,
        context: PolicyContext,
    ) -> Decision:
        if self._run_command is None:
            return decision
        answer = decision.ident
        ident_user = answer.user_id if answer is not None and answer.usable else None
        for template in rules.commands_for(rule, decision):
            command = expand_command(template, request, context, ident_user, os.getpid())
            try:
                self._run_command(command)
            except Exception:
                log.failure("rule command {command!r} could not be started", command=command)
        return decision


def _warn_unrun_commands(rules: RuleSet) -> None:
    for rule in rules.rules:
        if not rule.permits and rule.shell_command is not None:
            log.warn(
                "{location}: a command on a deny line never runs",
                location=rule.location,
                command=rule.shell_command,
            )


# --- the rule tester: python -m socksident.rules -----------------------------


class _TesterIdent:
    """A PolicyContext.ident that answers at once from the command line."""

    def __init__(self, user: Optional[str], no_identd: bool) -> None:
        self.user = user
        self.no_identd = no_identd
        self.asked = False

    def __call__(self) -> "Deferred[IdentAnswer]":
        from twisted.internet.defer import succeed

        self.asked = True
        if self.user is not None:
            return succeed(IdentAnswer(IdentOutcome.USER, user_id=self.user))
        return succeed(IdentAnswer(IdentOutcome.NO_ANSWER, error="no identd (tester)"))


def _tester_arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m socksident.rules",
        description="Show which rules-file line decides a SOCKS4/4A request, and what it would do.",
        epilog="Exit status: 0 permit (90), 1 deny (91/92/93), 2 usage or parse error.",
    )
    parser.add_argument("file", help="the rules file")
    parser.add_argument("--src", required=True, metavar="IP", help="the client's address")
    parser.add_argument(
        "--dst",
        required=True,
        metavar="HOST:PORT",
        help="destination; a name makes a SOCKS4A request",
    )
    parser.add_argument("--user", default="", metavar="NAME", help="the USERID the client sends")
    who = parser.add_mutually_exclusive_group()
    who.add_argument("--ident-user", metavar="NAME", help="what the client's identd answers")
    who.add_argument("--no-identd", action="store_true", help="the client's identd does not answer")
    parser.add_argument("--bind", action="store_true", help="a BIND request (default CONNECT)")
    parser.add_argument(
        "--ident",
        choices=("require", "check"),
        help="the global ident mode, as twistd's --ident (default off)",
    )
    parser.add_argument(
        "--addresses",
        metavar="IP,...",
        help="the addresses a HOST name resolves to, instead of asking DNS ('' for none)",
    )
    return parser


def _tester_request(args: argparse.Namespace) -> tuple[Request, tuple[str, ...]]:
    """The request exactly as the server would parse it, and its addresses."""
    host, _, port_text = args.dst.rpartition(":")
    if not host or not _NUMBER.fullmatch(port_text) or int(port_text) > 65535:
        raise ValueError(f"--dst {args.dst!r}: expected HOST:PORT with a port 0-65535")
    if _host_address(args.src) is None:
        raise ValueError(f"--src {args.src!r}: expected an IP address")
    command = Command.BIND if args.bind else Command.CONNECT
    is_ip = _is_ipv4(host)
    hostname = None if is_ip else host
    try:
        raw = build_request(command, int(port_text), host, _wire_user(args.user), hostname)
        request = RequestParser().feed(raw)
    except (ProtocolError, UnicodeError) as e:
        raise ValueError(f"cannot build the request: {e}") from None
    assert request is not None
    if is_ip:
        return request, (host,)
    if args.addresses is not None:
        addresses = tuple(a for a in args.addresses.split(",") if a)
        if not all(_host_address(a) is not None for a in addresses):
            raise ValueError(
                f"--addresses {args.addresses!r}: expected IP addresses separated by commas"
            )
        return request, addresses
    return request, _resolve(request.destination, request.port)


def _is_ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _resolve(name: str, port: int) -> tuple[str, ...]:
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return ()
    return tuple(dict.fromkeys(str(info[4][0]) for info in infos))


def _result(result: DecisionResult) -> Decision:
    if isinstance(result, Decision):
        return result
    decisions: list[Decision] = []
    result.addCallback(decisions.append)
    return decisions[0]


def _write_report(
    request: Request,
    context: PolicyContext,
    evaluation: Evaluation,
    ident: _TesterIdent,
    decision: Decision,
    commands: list[str],
) -> None:
    out = sys.stdout.write
    kind = "SOCKS4A" if request.is_socks4a else "SOCKS4"
    shown = ", ".join(context.addresses) or "none, the name did not resolve"
    out(
        f"request: {request.command.name.lower()} from {context.client_host} to "
        f"{request.destination}:{request.port} ({kind}; addresses: {shown}), "
        f"user {request.user_id!r}\n"
    )
    for address, rule in evaluation.matches:
        where = f" for {address}" if len(evaluation.matches) > 1 else ""
        line = "none (no line matches: deny)" if rule is None else f"{rule.location}: {rule.text}"
        out(f"line{where}: {line}\n")
    if not ident.asked:
        out("ident: not asked\n")
    elif ident.user is not None:
        out(f"ident: identd answers {ident.user!r}\n")
    elif ident.no_identd:
        out("ident: no answer (--no-identd)\n")
    else:
        out("ident: no answer (the line needs ident and neither --ident-user nor "
            "--no-identd was given: evaluated as --no-identd)\n")
    verb = "permit" if decision.granted else "deny"
    out(f"decision: {verb} ({int(decision.code)}): {decision.reason}\n")
    for command in commands:
        out(f"command: {command}\n")
    if not commands:
        rule = evaluation.rule
        unrun = rule is not None and not rule.permits and rule.shell_command
        out("command: none (commands on deny lines never run)\n" if unrun else "command: none\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The rule tester; returns the exit status (0 permit, 1 deny, 2 error)."""
    args = _tester_arguments().parse_args(argv)
    try:
        request, addresses = _tester_request(args)
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    commands: list[str] = []
    mode = IdentMode(args.ident) if args.ident else IdentMode.OFF
    try:
        policy = RulesPolicy(args.file, mode, run_command=commands.append)
    except RulesError as e:
        sys.stderr.write(f"{e}\n")
        return 2
    ident_user = _wire_user(args.ident_user) if args.ident_user is not None else None
    ident = _TesterIdent(ident_user, args.no_identd)
    context = PolicyContext(args.src, 0, "0.0.0.0", 1080, addresses, ident)
    if not addresses:
        # As the server does: a name that does not resolve is refused before
        # any rule (or identd) is consulted.
        evaluation = Evaluation(False, "", None, ())
        decision = Decision(ReplyCode.REJECTED, f"{request.destination} does not resolve")
    else:
        evaluation = policy.rules.evaluate(request, context)
        decision = _result(policy.check(request, context))
    _write_report(request, context, evaluation, ident, decision, commands)
    return 0 if decision.granted else 1


if __name__ == "__main__":
    sys.exit(main())
