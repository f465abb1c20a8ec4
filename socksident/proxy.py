"""Sans-IO PROXY protocol (HAProxy, versions 1 and 2) header parser.

A load balancer in TCP mode that speaks the PROXY protocol sends one header
before the client's own bytes, naming the client and the address it
connected to.  The server feeds a listener's first bytes to `HeaderParser`
before the SOCKS request, so the transport itself stays unwrapped
(half-close and the relay keep working) and the client address every later
step sees is the header's.  The parser accepts any split of the input, never
reads past the header, and refuses anything that is not a well-formed header
with a typed error.  Version 1 is at most 107 bytes; a version 2 header's
length must hold its address block and stay below `MAX_V2_LENGTH`.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass
from typing import Optional

__all__ = [
    "MAX_V1_LENGTH",
    "MAX_V2_LENGTH",
    "V2_SIGNATURE",
    "HeaderParser",
    "MalformedHeader",
    "NoProxyHeader",
    "ProxyCommand",
    "ProxyHeader",
    "ProxyHeaderError",
    "build_v1",
    "build_v2",
    "parse_v1_line",
]

#: "PROXY UNKNOWN" plus two IPv6 addresses and ports and CRLF: the spec's limit.
MAX_V1_LENGTH = 107
#: The 12-byte signature every version 2 header starts with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Bytes after the 16-byte fixed part; HAProxy's TLVs stay far below this.
MAX_V2_LENGTH = 4096

_V1_PREFIX = b"PROXY "
_V2_FIXED = 16
_V2_ADDRESS_LENGTH = {0x1: 12, 0x2: 36, 0x3: 216}  # INET, INET6, UNIX
_V2_FAMILY = {0x0: "UNSPEC", 0x1: "TCP4", 0x2: "TCP6", 0x3: "UNIX"}


class ProxyHeaderError(Exception):
    """The connection did not start with a usable PROXY header."""


class NoProxyHeader(ProxyHeaderError):
    """The first bytes are not a PROXY header at all (a client that bypassed the balancer)."""


class MalformedHeader(ProxyHeaderError):
    """A PROXY header that breaks the format or its length limits."""


class ProxyCommand(enum.Enum):
    """PROXY: a relayed client; LOCAL: the balancer's own connection (a health check)."""

    PROXY = "proxy"
    LOCAL = "local"


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed header.

    ``family`` is ``TCP4`` or ``TCP6`` when ``source`` and ``destination``
    (host, port) are known; ``UNKNOWN`` (v1), ``UNSPEC`` or ``UNIX`` (v2)
    carry no TCP addresses and leave them None.
    """

    version: int
    command: ProxyCommand
    family: str
    source: Optional[tuple[str, int]] = None
    destination: Optional[tuple[str, int]] = None

    @property
    def has_tcp_addresses(self) -> bool:
        return self.source is not None and self.destination is not None


class HeaderParser:
    """Feed bytes until `feed` returns the header; `leftover` holds what followed it."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.leftover = b""
        self.header: Optional[ProxyHeader] = None

    def feed(self, data: bytes) -> Optional[ProxyHeader]:
        """The header once complete, else None; raises `ProxyHeaderError`."""
        if self.header is not None:
            raise RuntimeError("the header is already complete")
        self._buffer += data
        buffer = bytes(self._buffer)
        if not buffer:
            return None
        if buffer[0:1] == b"P":
            return self._v1(buffer)
        if buffer[0:1] == b"\r":
            return self._v2(buffer)
        raise NoProxyHeader(f"no PROXY header: the connection starts with {buffer[:8]!r}")

    def _done(self, header: ProxyHeader, end: int, buffer: bytes) -> ProxyHeader:
        self.header = header
        self.leftover = buffer[end:]
        self._buffer.clear()
        return header

    # -- version 1: "PROXY TCP4 1.2.3.4 5.6.7.8 1234 80\r\n" ---------------------

    def _v1(self, buffer: bytes) -> Optional[ProxyHeader]:
        prefix = buffer[: len(_V1_PREFIX)]
        if not _V1_PREFIX.startswith(prefix):
            raise NoProxyHeader(f"no PROXY header: the connection starts with {buffer[:8]!r}")
        end = buffer.find(b"\r\n", 0, MAX_V1_LENGTH)
        if end < 0:
            if len(buffer) >= MAX_V1_LENGTH:
                raise MalformedHeader(f"PROXY v1 line longer than {MAX_V1_LENGTH} bytes")
            if b"\n" in buffer:
                raise MalformedHeader("PROXY v1 line ends without CRLF")
            return None
        return self._done(parse_v1_line(buffer[:end]), end + 2, buffer)

    # -- version 2: signature, version/command, family, length, addresses, TLVs --

    def _v2(self, buffer: bytes) -> Optional[ProxyHeader]:
        signature = buffer[: len(V2_SIGNATURE)]
        if not V2_SIGNATURE.startswith(signature):
            raise NoProxyHeader(f"no PROXY header: the connection starts with {buffer[:8]!r}")
        if len(buffer) < _V2_FIXED:
            return None
        version_command, family_protocol, length = struct.unpack_from("!BBH", buffer, 12)
        if version_command >> 4 != 2:
            raise MalformedHeader(f"PROXY v2 header with version {version_command >> 4}")
        command_bits = version_command & 0x0F
        if command_bits not in (0, 1):
            raise MalformedHeader(f"PROXY v2 header with command {command_bits}")
        family_bits, protocol_bits = family_protocol >> 4, family_protocol & 0x0F
        if family_bits not in _V2_FAMILY or protocol_bits > 2:
            raise MalformedHeader(f"PROXY v2 header with family/protocol {family_protocol:#04x}")
        if length > MAX_V2_LENGTH:
            raise MalformedHeader(f"PROXY v2 header of {length} bytes (limit {MAX_V2_LENGTH})")
        needed = _V2_ADDRESS_LENGTH.get(family_bits, 0)
        if length < needed:
            raise MalformedHeader(
                f"PROXY v2 {_V2_FAMILY[family_bits]} header of {length} bytes"
                f" cannot hold its {needed}-byte addresses"
            )
        if len(buffer) < _V2_FIXED + length:
            return None
        command = ProxyCommand.LOCAL if command_bits == 0 else ProxyCommand.PROXY
        family = _V2_FAMILY[family_bits]
        if family in ("TCP4", "TCP6") and protocol_bits != 1:
            family = "UNSPEC" if protocol_bits == 0 else "UDP" + family[-1]
        body = buffer[_V2_FIXED : _V2_FIXED + length]
        source = destination = None
        if family == "TCP4":
            src, dst, sport, dport = struct.unpack_from("!4s4sHH", body)
            source = (str(ipaddress.IPv4Address(src)), sport)
            destination = (str(ipaddress.IPv4Address(dst)), dport)
        elif family == "TCP6":
            src, dst, sport, dport = struct.unpack_from("!16s16sHH", body)
            source = (str(ipaddress.IPv6Address(src)), sport)
            destination = (str(ipaddress.IPv6Address(dst)), dport)
        header = ProxyHeader(2, command, family, source, destination)
        return self._done(header, _V2_FIXED + length, buffer)


def _v1_address(family: str, text: bytes) -> str:
    try:
        value = text.decode("ascii")
        address = (
            ipaddress.IPv4Address(value) if family == "TCP4" else ipaddress.IPv6Address(value)
        )
    except (UnicodeDecodeError, ValueError):
        raise MalformedHeader(f"PROXY v1 {family} header with address {text!r}")
    return str(address)


def _v1_port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0"):
        raise MalformedHeader(f"PROXY v1 header with port {text!r}")
    port = int(text)
    if port > 65535:
        raise MalformedHeader(f"PROXY v1 header with port {text!r}")
    return port


def parse_v1_line(line: bytes) -> ProxyHeader:
    """One v1 line without its CRLF."""
    fields = line.split(b" ")
    if len(fields) < 2 or fields[0] != b"PROXY":
        raise MalformedHeader(f"PROXY v1 line {line!r}")
    family = fields[1].decode("ascii", "replace")
    if family == "UNKNOWN":  # the rest of the line is to be ignored
        return ProxyHeader(1, ProxyCommand.PROXY, family)
    if family not in ("TCP4", "TCP6"):
        raise MalformedHeader(f"PROXY v1 header with protocol {fields[1]!r}")
    if len(fields) != 6:
        raise MalformedHeader(f"PROXY v1 line {line!r}")
    source = (_v1_address(family, fields[2]), _v1_port(fields[4]))
    destination = (_v1_address(family, fields[3]), _v1_port(fields[5]))
    return ProxyHeader(1, ProxyCommand.PROXY, family, source, destination)


def build_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v1 header, as a balancer would send it (for tests and clients)."""
    family = "TCP6" if ":" in source[0] else "TCP4"
    return (
        f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
    ).encode("ascii")


def build_v2(
    source: Optional[tuple[str, int]] = None,
    destination: Optional[tuple[str, int]] = None,
    *,
    local: bool = False,
    tlvs: bytes = b"",
) -> bytes:
    """A v2 header: PROXY over TCP4/TCP6, or UNSPEC without addresses; LOCAL if asked."""
    command = 0x20 if local else 0x21
    if source is None or destination is None:
        return V2_SIGNATURE + struct.pack("!BBH", command, 0x00, len(tlvs)) + tlvs
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1]) + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", command, family, len(body)) + body
