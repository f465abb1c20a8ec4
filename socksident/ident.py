"""RFC 1413 (IDENT) without I/O: the query and the strict response parser.

It knows nothing of SOCKS: what an answer means for a request (90, 92 or
93) is the policy's `socksident.policy.verdict`.  The Twisted client that
carries these bytes lives in `socksident.identclient`.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Optional

__all__ = [
    "ERROR_TYPES",
    "MAX_RESPONSE_LINE",
    "MAX_TOKEN_LENGTH",
    "MAX_USER_ID_OCTETS",
    "IdentAnswer",
    "IdentOutcome",
    "MalformedResponse",
    "ResponseReader",
    "build_query",
    "parse_response",
]

#: A client may give up after this many bytes without an end of line (RFC 1413).
MAX_RESPONSE_LINE = 1000
#: Longest OPSYS, CHARSET or ERROR token (RFC 1413).
MAX_TOKEN_LENGTH = 64
#: Longest user id a client must accept (RFC 1413); we accept no more.
MAX_USER_ID_OCTETS = 512

#: The error types RFC 1413 defines; private ones start with "X".
ERROR_TYPES = frozenset({"INVALID-PORT", "NO-USER", "HIDDEN-USER", "UNKNOWN-ERROR"})


class IdentOutcome(enum.Enum):
    USER = "user"  # the identd named a user
    ERROR = "error"  # the identd answered ERROR : <type>
    NO_ANSWER = "no-answer"  # refused, unreachable, timed out, or garbage


@dataclass(frozen=True, slots=True)
class IdentAnswer:
    """What one ident query produced; never raised, always returned."""

    outcome: IdentOutcome
    user_id: Optional[str] = None  # Latin-1 decoded, surrounding blanks trimmed
    opsys: Optional[str] = None
    charset: Optional[str] = None
    error: Optional[str] = None  # ERROR type, or why there was no answer
    duration: float = 0.0

    @property
    def usable(self) -> bool:
        return self.outcome is IdentOutcome.USER


class MalformedResponse(ValueError):
    """The identd's reply is not RFC 1413, so it confirms nothing.

    Callers treat it like no answer at all (RFC 1413 equates a premature close
    with UNKNOWN-ERROR); the message says what was wrong, for the log.
    """


def build_query(client_port: int, server_port: int) -> bytes:
    """The one query line.

    The identd's "server" is the SOCKS client's host, so its port (the
    client's source port) goes first and the proxy's port second.
    """
    for port in (client_port, server_port):
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is not in 1-65535")
    return b"%d , %d\r\n" % (client_port, server_port)


_BLANKS = " \t"
_PORT = re.compile(r"[ \t]*([0-9]{1,5})[ \t]*\Z")
# Printable ASCII except ":" (the field separator).  RFC 1413's list omits
# digits, yet real names such as "UTF-8" carry them, so digits are accepted.
# OPSYS and CHARSET cannot hold "," because the field is split on it first.
_TOKEN = re.compile(r"[!-9;-~]{1,%d}\Z" % MAX_TOKEN_LENGTH)


def _token(text: str, what: str) -> str:
    token = text.strip(_BLANKS)
    if not token:
        raise MalformedResponse(f"empty {what}")
    if len(token) > MAX_TOKEN_LENGTH:
        raise MalformedResponse(f"{what} longer than {MAX_TOKEN_LENGTH} characters")
    if not _TOKEN.match(token):
        raise MalformedResponse(f"invalid {what} {token!r}")
    return token


def _port(text: str) -> int:
    match = _PORT.match(text)
    if match is None:
        raise MalformedResponse(f"invalid port {text.strip(_BLANKS)!r}")
    return int(match.group(1))


def parse_response(line: bytes, client_port: int, server_port: int) -> IdentAnswer:
    """Parse one reply line (without its line ending) strictly.

    Strict because the answer decides access: anything that is not exactly
    RFC 1413, or that answers for another port pair, raises
    `MalformedResponse` rather than being guessed at.  The user id is
    everything after the colon that follows OPSYS[,CHARSET], with surrounding
    spaces and tabs trimmed, decoded as Latin-1 so that it compares exactly
    with the SOCKS request's USERID.
    """
    if b"\r" in line or b"\n" in line:
        raise MalformedResponse("CR or LF inside the reply line")
    if len(line) > MAX_RESPONSE_LINE:
        raise MalformedResponse(f"reply longer than {MAX_RESPONSE_LINE} bytes")
    text = line.decode("latin-1")
    fields = text.split(":", 3)
    if len(fields) < 3:
        raise MalformedResponse(f"too few fields in {_excerpt(line)}")
    pair = fields[0].split(",")
    if len(pair) != 2:
        raise MalformedResponse(f"no port pair in {_excerpt(line)}")
    ports = (_port(pair[0]), _port(pair[1]))
    if ports != (client_port, server_port):
        raise MalformedResponse(
            f"reply is for ports {ports[0]} , {ports[1]}, "
            f"the query was for {client_port} , {server_port}"
        )
    kind = fields[1].strip(_BLANKS)
    if kind == "ERROR":
        if len(fields) != 3:
            raise MalformedResponse("colon in the ERROR type")
        error = _token(fields[2], "error type")
        if error not in ERROR_TYPES and not (error.startswith("X") and len(error) > 1):
            raise MalformedResponse(f"unknown error type {error!r}")
        return IdentAnswer(IdentOutcome.ERROR, error=error)
    if kind != "USERID":
        raise MalformedResponse(f"unknown reply type {kind[:MAX_TOKEN_LENGTH]!r}")
    if len(fields) != 4:
        raise MalformedResponse("USERID reply without a user id field")
    opsys_field = fields[2].split(",")
    if len(opsys_field) > 2:
        raise MalformedResponse("more than one comma in the OPSYS field")
    opsys = _token(opsys_field[0], "opsys")
    charset = _token(opsys_field[1], "charset") if len(opsys_field) == 2 else None
    user_id = fields[3].strip(_BLANKS)
    if not user_id:
        raise MalformedResponse("empty user id")
    if len(user_id) > MAX_USER_ID_OCTETS:
        raise MalformedResponse(f"user id longer than {MAX_USER_ID_OCTETS} octets")
    if "\x00" in user_id:
        raise MalformedResponse("NUL in the user id")
    return IdentAnswer(IdentOutcome.USER, user_id=user_id, opsys=opsys, charset=charset)


def _excerpt(line: bytes) -> str:
    return repr(line[:80]) + ("..." if len(line) > 80 else "")


class ResponseReader:
    """Collect the identd's bytes until one line is complete, then parse it.

    Bytes arrive in arbitrary pieces; the reader accepts CRLF and a bare LF
    and gives up after `MAX_RESPONSE_LINE` bytes without one, so a hostile
    identd cannot make us buffer without end.
    """

    def __init__(self, client_port: int, server_port: int) -> None:
        self._client_port = client_port
        self._server_port = server_port
        self._buffer = bytearray()
        self.answer: Optional[IdentAnswer] = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete line: bounded by `MAX_RESPONSE_LINE`."""
        return len(self._buffer)

    def feed(self, data: bytes) -> Optional[IdentAnswer]:
        """Return the answer once its line ending has arrived, else None.

        Bytes after the first line are ignored: the identd owes exactly one.
        """
        if self.answer is not None:
            return self.answer
        self._buffer += data
        end = self._buffer.find(b"\n")
        line = self._buffer if end < 0 else self._buffer[:end]
        if line.endswith(b"\r"):  # the line ending's first half does not count
            line = line[:-1]
        if len(line) > MAX_RESPONSE_LINE:
            raise MalformedResponse(
                f"more than {MAX_RESPONSE_LINE} bytes without a line ending"
            )
        if end < 0:
            return None
        raw = bytes(line)
        self._buffer = bytearray()
        self.answer = parse_response(raw, self._client_port, self._server_port)
        return self.answer

    def connection_closed(self) -> None:
        """Raise `MalformedResponse` unless a complete line was read.

        A premature close means UNKNOWN-ERROR in RFC 1413; for us it is no
        answer, so it is reported the same way as garbage.
        """
        if self.answer is None:
            raise MalformedResponse("connection closed before a complete line")
