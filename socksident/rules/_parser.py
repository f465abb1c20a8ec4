"""Reading a rules file: one line at a time into `Rule` values, every error
as ``FILE:LINE: what is wrong; expected ...``."""

from __future__ import annotations

import ipaddress
import re
import socket
from collections import deque
from typing import Optional

from socksident.policy import IdentMode, Route
from socksident.rules._model import (
    OPERATORS,
    Action,
    AddressMask,
    Destination,
    DomainSuffix,
    PortTest,
    Rule,
    RuleSet,
)
from socksident.rules._template import template_problem
from socksident.socks4 import Command, is_valid_hostname

__all__ = ["MAX_LINE_LENGTH", "RulesError", "load_rules", "parse_rules", "wire_user"]

#: Longest line the classic sockd read (its buffer held 1024 with the newline).
MAX_LINE_LENGTH = 1023

IDENT_OPTIONS = {"?=I": IdentMode.REQUIRE, "?=i": IdentMode.CHECK, "?=n": IdentMode.OFF}
SOCKS_COMMANDS = {"connect": Command.CONNECT, "bind": Command.BIND}
ROUTES = {"via=next-hop": Route.NEXT_HOP, "via=direct": Route.DIRECT}
NO_IDENTD = "#NO_IDENTD:"
BAD_ID = "#BAD_ID:"

_OPERATOR_LIST = ", ".join(OPERATORS)
_NUMBER = re.compile(r"[0-9]+")
_WORD = re.compile(r"\S+")
# A word that is an IPv6 address or network (at least two colons), so that
# its colons are not taken for the ': command' separator.
_IPV6_WORD = re.compile(r"[0-9A-Fa-f.]*:[0-9A-Fa-f.]*:[0-9A-Fa-f:.]*(/[0-9]*)?")
_LIST_SEPARATORS = re.compile(rb"[ \t\r\v\f,]+")


class RulesError(Exception):
    """A rules file that cannot be used; the message starts with FILE:LINE."""


class _LineError(Exception):
    """What is wrong with one line; `parse_rules` adds FILE:LINE."""


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
    ident_mode, users, route = _parse_options(words)
    if route is not None and action is not Action.PERMIT:
        raise _LineError("a route (via=...) on a deny line; routes go on permit lines")
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
        route,
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
    problem = template_problem(command)
    if problem is not None:
        raise _LineError(problem)


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


def _parse_options(
    words: deque[str],
) -> tuple[Optional[IdentMode], Optional[frozenset[str]], Optional[Route]]:
    """The optional ``?=``, ``*=`` and ``via=`` fields, in any order, each at most once."""
    ident_mode: Optional[IdentMode] = None
    users: Optional[frozenset[str]] = None
    route: Optional[Route] = None
    while words and (words[0][:2] in ("?=", "*=") or words[0].startswith("via=")):
        word = words.popleft()
        if word.startswith("via="):
            if route is not None:
                raise _LineError(f"second route {word!r}; expected at most one via=")
            if word not in ROUTES:
                raise _LineError(
                    f"unknown route {word!r}; expected via=next-hop or via=direct"
                )
            route = ROUTES[word]
        elif word.startswith("?="):
            if ident_mode is not None:
                raise _LineError(f"second ident option {word!r}; expected at most one ?=")
            if word not in IDENT_OPTIONS:
                raise _LineError(f"unknown ident option {word!r}; expected ?=I, ?=i or ?=n")
            ident_mode = IDENT_OPTIONS[word]
        else:
            if users is not None:
                raise _LineError(f"second user list {word!r}; expected at most one *=")
            users = _parse_users(word[2:])
    return ident_mode, users, route


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
            users.add(wire_user(entry))
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


def wire_user(text: str) -> str:
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
