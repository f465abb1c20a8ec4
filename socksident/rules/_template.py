"""A rule command's ``%`` substitutions: the check at parse time and the
expansion, with every substituted value made safe for the shell."""

from __future__ import annotations

import re
import socket
from typing import Optional

from socksident.policy import PolicyContext
from socksident.rules._model import host_address
from socksident.socks4 import Request

__all__ = ["SUBSTITUTIONS", "expand_command", "sanitize", "template_problem"]

SUBSTITUTIONS = "AacpSsUuZz%"

_UNSAFE = re.compile(r"[^0-9A-Za-z!@%\-_=+\\:,./]")
_PERCENT = re.compile(r"%(.)", re.DOTALL)


def template_problem(command: str) -> Optional[str]:
    """What is wrong with a command's ``%`` substitutions, or None."""
    for match in _PERCENT.finditer(command):
        if match.group(1) not in SUBSTITUTIONS:
            return (
                f"unknown substitution {match.group()!r} in the command; expected one of "
                + " ".join("%" + c for c in SUBSTITUTIONS)
            )
    if _PERCENT.sub("", command).endswith("%"):
        return "a lone '%' ends the command; write '%%' for a percent sign"
    return None


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
    client = host_address(context.client_host)
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
