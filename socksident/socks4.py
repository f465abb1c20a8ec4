"""SOCKS4 and SOCKS4A wire format, without I/O.

The parser is fed bytes in whatever pieces the network delivers and returns
a typed `Request` once one is complete.  Every way a request can be wrong is
a `ProtocolError` subclass that knows whether the client deserves a SOCKS4
reply (91) or only a close, so the Twisted layer never has to guess.

Every refusal, wherever it is decided (the codec, a policy, BIND, a next
hop), is one `SOCKS4Refusal` subclass per reply code: the server sends its
``code`` and logs its ``reason``, and the client endpoint raises the same
classes for the codes a proxy answers.  The names are txsocksx's, so code
moving from that client changes only an import.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
import socket
import struct
from dataclasses import dataclass
from typing import ClassVar, Optional, Union

from socksident.address import ip_of

__all__ = [
    "HTTP_NOT_A_WEB_PROXY",
    "SOCKS5_NO_ACCEPTABLE_METHODS",
    "MAX_HOSTNAME_LENGTH",
    "MAX_USER_ID_LENGTH",
    "REFUSALS",
    "Command",
    "FieldTooLong",
    "IdentdMismatch",
    "IdentdUnreachable",
    "InvalidHostname",
    "MalformedRequest",
    "NotSocks4",
    "ProtocolError",
    "ReplyCode",
    "Request",
    "RequestParser",
    "RequestRejectedOrFailed",
    "SOCKS4Refusal",
    "UnknownCommand",
    "build_reply",
    "build_request",
    "foreign_protocol_answer",
    "is_socks4a_marker",
    "is_valid_hostname",
    "parse_reply",
    "refusal_for",
    "reply_address",
]

#: Longest USERID we accept, in bytes, not counting its NUL.
MAX_USER_ID_LENGTH = 255
#: Longest SOCKS4A host name we accept, in bytes, not counting its NUL.
MAX_HOSTNAME_LENGTH = 255

SOCKS4_VERSION = 4
REPLY_VERSION = 0

_HEADER = struct.Struct("!BBH4s")
_REPLY = struct.Struct("!BBH4s")
_LABEL = re.compile(rb"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")


class Command(enum.IntEnum):
    CONNECT = 1
    BIND = 2


class ReplyCode(enum.IntEnum):
    """The four result codes of the protocol, named for what they mean."""

    GRANTED = 90
    REJECTED = 91
    IDENTD_UNREACHABLE = 92
    IDENT_MISMATCH = 93


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed SOCKS4 or SOCKS4A request.

    ``address`` is the DSTIP as written; for SOCKS4A it is the 0.0.0.x marker
    and ``hostname`` holds the name the client could not resolve.  The user id
    is decoded as Latin-1 so that every octet survives and comparisons with the
    ident answer stay exact.
    """

    command: Command
    port: int
    address: str
    user_id: str
    hostname: Optional[str] = None

    @property
    def is_socks4a(self) -> bool:
        return self.hostname is not None

    @property
    def destination(self) -> str:
        """The destination host as the client named it."""
        return self.hostname if self.hostname is not None else self.address


class SOCKS4Refusal(Exception):
    """A request that ends with the reply `code`; `reason` is for the log."""

    code: ClassVar[ReplyCode]

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RequestRejectedOrFailed(SOCKS4Refusal):
    """91: refused by policy, or the connection could not be made."""

    code = ReplyCode.REJECTED


class IdentdUnreachable(SOCKS4Refusal):
    """92: no usable answer from the client's identd."""

    code = ReplyCode.IDENTD_UNREACHABLE


class IdentdMismatch(SOCKS4Refusal):
    """93: the identd names another user than the USERID."""

    code = ReplyCode.IDENT_MISMATCH


#: The refusal class for each reply code a request can end with.
REFUSALS: dict[ReplyCode, type[SOCKS4Refusal]] = {
    cls.code: cls for cls in (RequestRejectedOrFailed, IdentdUnreachable, IdentdMismatch)
}


def refusal_for(code: ReplyCode, reason: str) -> SOCKS4Refusal:
    """The refusal that answers `code` (91, 92 or 93)."""
    return REFUSALS[code](reason)


class ProtocolError(Exception):
    """Bytes that are not a request we can serve.

    ``reply`` is the reply code to send before closing, or None when the peer
    does not speak SOCKS4 and a SOCKS4 reply would only be noise to it.
    """

    reply: ClassVar[Optional[ReplyCode]] = None

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotSocks4(ProtocolError):
    """The first byte is not version 4: no SOCKS4 reply is owed."""

    def __init__(self, reason: str, first_bytes: bytes) -> None:
        super().__init__(reason)
        self.first_bytes = first_bytes


class MalformedRequest(ProtocolError, RequestRejectedOrFailed):
    """A SOCKS4 request that cannot be served as written: 91."""

    reply = ReplyCode.REJECTED


class UnknownCommand(MalformedRequest):
    pass


class FieldTooLong(MalformedRequest):
    pass


class InvalidHostname(MalformedRequest):
    pass


def is_socks4a_marker(packed_ip: bytes) -> bool:
    """DSTIP 0.0.0.x with x != 0 announces a SOCKS4A host name."""
    return packed_ip[:3] == b"\x00\x00\x00" and packed_ip[3] != 0


def is_valid_hostname(name: bytes) -> bool:
    """Dot-separated labels of letters, digits, "-" and "_"; one trailing dot allowed."""
    if name.endswith(b"."):
        name = name[:-1]
    if not name:
        return False
    return all(_LABEL.match(label) for label in name.split(b"."))


class RequestParser:
    """Incremental parser for exactly one request.

    Call `feed` with each chunk; it returns the `Request` once complete and
    None while more bytes are needed.  Bytes past the end of the request (data
    a client sends before its reply) are kept in `leftover`, in order.
    """

    def __init__(
        self,
        max_user_id_length: int = MAX_USER_ID_LENGTH,
        max_hostname_length: int = MAX_HOSTNAME_LENGTH,
    ) -> None:
        self._buffer = bytearray()
        self._max_user_id = max_user_id_length
        self._max_hostname = max_hostname_length
        self.request: Optional[Request] = None
        self.leftover = b""

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete request: bounded by the field limits."""
        return len(self._buffer)

    def feed(self, data: bytes) -> Optional[Request]:
        if self.request is not None:
            self.leftover += data
            return self.request
        self._buffer += data
        request, consumed = self._parse()
        if request is not None:
            self.request = request
            self.leftover = bytes(self._buffer[consumed:])
            self._buffer = bytearray()
        return request

    def _parse(self) -> tuple[Optional[Request], int]:
        buf = self._buffer
        if buf and buf[0] != SOCKS4_VERSION:
            raise NotSocks4(
                f"version byte {buf[0]} is not SOCKS4", bytes(buf[:16])
            )
        if len(buf) < 2:
            return None, 0
        if buf[1] not in (Command.CONNECT, Command.BIND):
            raise UnknownCommand(f"unknown command code {buf[1]}")
        if len(buf) < _HEADER.size:
            return None, 0
        _, code, port, packed_ip = _HEADER.unpack_from(buf)
        user_end = buf.find(b"\x00", _HEADER.size)
        if user_end < 0:
            if len(buf) - _HEADER.size > self._max_user_id:
                raise FieldTooLong(
                    f"USERID longer than {self._max_user_id} bytes"
                )
            return None, 0
        if user_end - _HEADER.size > self._max_user_id:
            raise FieldTooLong(f"USERID longer than {self._max_user_id} bytes")
        user_id = bytes(buf[_HEADER.size:user_end]).decode("latin-1")
        address = socket.inet_ntoa(packed_ip)
        end = user_end + 1
        hostname = None
        if is_socks4a_marker(packed_ip):
            name_end = buf.find(b"\x00", end)
            if name_end < 0:
                if len(buf) - end > self._max_hostname:
                    raise FieldTooLong(
                        f"host name longer than {self._max_hostname} bytes"
                    )
                return None, 0
            raw_name = bytes(buf[end:name_end])
            if len(raw_name) > self._max_hostname:
                raise FieldTooLong(
                    f"host name longer than {self._max_hostname} bytes"
                )
            if not is_valid_hostname(raw_name):
                raise InvalidHostname(f"invalid host name {raw_name!r}")
            hostname = raw_name.decode("ascii").rstrip(".").lower()
            end = name_end + 1
        request = Request(Command(code), port, address, user_id, hostname)
        return request, end


def _reply_address(host: str) -> str:
    """The DSTIP a reply can carry for `host`: replies hold IPv4 only, and
    0.0.0.0 tells the client to use the proxy's own address."""
    address = ip_of(host)
    return str(address) if isinstance(address, ipaddress.IPv4Address) else "0.0.0.0"


#: Cached: every reply asks it again for the same few addresses.
reply_address = functools.lru_cache(maxsize=4096)(_reply_address)


def build_reply(
    code: ReplyCode, port: int = 0, address: Union[str, bytes] = "0.0.0.0"
) -> bytes:
    """The 8-byte reply: VN 0, CD, DSTPORT, DSTIP."""
    if isinstance(address, str):
        try:
            address = socket.inet_pton(socket.AF_INET, address)
        except OSError:
            raise ValueError(f"not a dotted-quad IPv4 address: {address!r}") from None
    return _REPLY.pack(REPLY_VERSION, int(code), port, address)


SOCKS5_NO_ACCEPTABLE_METHODS = b"\x05\xff"
HTTP_NOT_A_WEB_PROXY = (
    b"HTTP/1.0 400 Bad Request\r\n"
    b"Content-Type: text/plain\r\n"
    b"Connection: close\r\n\r\n"
    b"This is a SOCKS4/SOCKS4A proxy, not an HTTP proxy. "
    b"Configure your client for SOCKS4 or SOCKS4A.\r\n"
)


def foreign_protocol_answer(first_bytes: bytes) -> tuple[bytes, str]:
    """What to tell a peer that does not speak SOCKS4, and what it spoke.

    A SOCKS5 client understands "no acceptable methods" and a browser set up
    for an HTTP proxy a plain 400; anything else gets nothing (``b""``).
    """
    if first_bytes[:1] == b"\x05":
        return SOCKS5_NO_ACCEPTABLE_METHODS, "a SOCKS5 greeting"
    if first_bytes[:1].isalpha():
        return HTTP_NOT_A_WEB_PROXY, "what looks like HTTP"
    return b"", "not SOCKS4"


def build_request(
    command: Command,
    port: int,
    address: str,
    user_id: Union[str, bytes] = b"",
    hostname: Optional[str] = None,
) -> bytes:
    """The request a client sends; the rule tester and the tests use it."""
    if isinstance(user_id, str):
        user_id = user_id.encode("latin-1")
    packed = ipaddress.IPv4Address("0.0.0.1" if hostname else address).packed
    out = _HEADER.pack(SOCKS4_VERSION, int(command), port, packed)
    out += user_id + b"\x00"
    if hostname:
        out += hostname.encode("ascii") + b"\x00"
    return out


def parse_reply(data: bytes) -> tuple[int, int, str]:
    """Split an 8-byte reply into (code, port, IPv4 address)."""
    if len(data) != _REPLY.size:
        raise ValueError(f"a reply is {_REPLY.size} bytes, got {len(data)}")
    _, code, port, packed = _REPLY.unpack(data)
    return code, port, str(ipaddress.IPv4Address(packed))
