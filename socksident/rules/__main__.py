"""The rule tester: ``python -m socksident.rules FILE --src IP --dst HOST:PORT``.

It evaluates one request exactly as the server would, without running the
server, and prints the matching line, the ident step, the decision and the
commands that would run (expanded, not run).  Exit status: 0 permit, 1 deny,
2 usage or parse error.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import socket
import sys
from typing import Optional, Sequence

from twisted.internet.defer import Deferred, succeed

from socksident.ident import IdentAnswer, IdentOutcome
from socksident.policy import (
    Decision,
    DecisionResult,
    IdentMode,
    PolicyContext,
    Route,
    through_next_hop,
)
from socksident.rules._model import Evaluation, host_address
from socksident.rules._parser import RulesError, wire_user
from socksident.rules._policy import RulesPolicy
from socksident.socks4 import (
    Command,
    ProtocolError,
    ReplyCode,
    Request,
    RequestRejectedOrFailed,
    RequestParser,
    build_request,
)

__all__ = ["main"]

_NUMBER = re.compile(r"[0-9]+")


class _TesterIdent:
    """A PolicyContext.ident that answers at once from the command line."""

    def __init__(self, user: Optional[str], no_identd: bool) -> None:
        self.user = user
        self.no_identd = no_identd
        self.asked = False

    def __call__(self) -> Deferred[IdentAnswer]:
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
        "--next-hop",
        action="store_true",
        help="the server runs with --next-hop (names that do not resolve go there)",
    )
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
    if host_address(args.src) is None:
        raise ValueError(f"--src {args.src!r}: expected an IP address")
    command = Command.BIND if args.bind else Command.CONNECT
    is_ip = _is_ipv4(host)
    hostname = None if is_ip else host
    try:
        raw = build_request(command, int(port_text), host, wire_user(args.user), hostname)
        request = RequestParser().feed(raw)
    except (ProtocolError, UnicodeError) as e:
        raise ValueError(f"cannot build the request: {e}") from None
    assert request is not None
    if is_ip:
        return request, (host,)
    if args.addresses is not None:
        addresses = tuple(a for a in args.addresses.split(",") if a)
        if not all(host_address(a) is not None for a in addresses):
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


def _routed(
    decision: Decision, request: Request, resolved: bool, next_hop: bool
) -> tuple[Decision, str]:
    """Where the server would send a granted request (`policy.through_next_hop`)."""
    if not decision.granted:
        return decision, ""
    try:
        via = through_next_hop(decision, request.destination, resolved, next_hop)
    except RequestRejectedOrFailed as refusal:
        return Decision(ReplyCode.REJECTED, refusal.reason, decision.rule), ""
    if not via:  # the default says nothing; a via=direct line is shown
        return decision, "direct (via=direct)" if decision.route is Route.DIRECT else ""
    why = "via=next-hop" if decision.route is Route.NEXT_HOP else "the name does not resolve here"
    return decision, f"through the next hop ({why})"


def _write_report(
    request: Request,
    context: PolicyContext,
    evaluation: Evaluation,
    ident: _TesterIdent,
    decision: Decision,
    commands: list[str],
    route: str,
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
    if route:
        out(f"route: {route}\n")
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
    ident_user = wire_user(args.ident_user) if args.ident_user is not None else None
    ident = _TesterIdent(ident_user, args.no_identd)
    context = PolicyContext(args.src, 0, "0.0.0.0", 1080, addresses, ident)
    route = ""
    if not addresses and not args.next_hop:
        # As the server does: a name that does not resolve is refused before
        # any rule (or identd) is consulted.
        evaluation = Evaluation(False, "", None, ())
        decision = Decision(ReplyCode.REJECTED, f"{request.destination} does not resolve")
    else:
        evaluation = policy.rules.evaluate(request, context)
        decision = _result(policy.check(request, context))
        decision, route = _routed(decision, request, bool(addresses), args.next_hop)
        if decision.granted and decision.on_granted is not None:
            decision.on_granted()  # as the server does once it has replied 90
    _write_report(request, context, evaluation, ident, decision, commands, route)
    return 0 if decision.granted else 1


if __name__ == "__main__":
    sys.exit(main())
