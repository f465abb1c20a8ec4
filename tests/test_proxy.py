"""The PROXY header codec alone: no Twisted, every split of the input."""

from __future__ import annotations

import struct

import pytest

from socksident.proxy import (
    MAX_V1_LENGTH,
    MAX_V2_LENGTH,
    V2_SIGNATURE,
    HeaderParser,
    MalformedHeader,
    NoProxyHeader,
    ProxyCommand,
    ProxyHeader,
    build_v1,
    build_v2,
)

SOCKS = b"\x04\x01\x00\x50\xc0\x00\x02\x07alice\x00"

HEADERS = {
    "v1-tcp4": (
        b"PROXY TCP4 203.0.113.5 192.0.2.1 40000 1080\r\n",
        ProxyHeader(1, ProxyCommand.PROXY, "TCP4", ("203.0.113.5", 40000), ("192.0.2.1", 1080)),
    ),
    "v1-tcp6": (
        b"PROXY TCP6 2001:db8::5 2001:db8::1 65535 1080\r\n",
        ProxyHeader(1, ProxyCommand.PROXY, "TCP6", ("2001:db8::5", 65535), ("2001:db8::1", 1080)),
    ),
    "v1-unknown": (
        b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
        ProxyHeader(1, ProxyCommand.PROXY, "UNKNOWN"),
    ),
    "v2-tcp4": (
        build_v2(("203.0.113.5", 40000), ("192.0.2.1", 1080)),
        ProxyHeader(2, ProxyCommand.PROXY, "TCP4", ("203.0.113.5", 40000), ("192.0.2.1", 1080)),
    ),
    "v2-tcp6": (
        build_v2(("2001:db8::5", 1), ("2001:db8::1", 1080)),
        ProxyHeader(2, ProxyCommand.PROXY, "TCP6", ("2001:db8::5", 1), ("2001:db8::1", 1080)),
    ),
    "v2-tcp4-with-tlvs": (
        build_v2(("203.0.113.5", 40000), ("192.0.2.1", 1080), tlvs=b"\x04\x00\x03abc"),
        ProxyHeader(2, ProxyCommand.PROXY, "TCP4", ("203.0.113.5", 40000), ("192.0.2.1", 1080)),
    ),
    "v2-local": (
        build_v2(local=True),
        ProxyHeader(2, ProxyCommand.LOCAL, "UNSPEC"),
    ),
    "v2-local-with-addresses": (
        build_v2(("127.0.0.1", 5), ("127.0.0.1", 6), local=True),
        ProxyHeader(2, ProxyCommand.LOCAL, "TCP4", ("127.0.0.1", 5), ("127.0.0.1", 6)),
    ),
    "v2-unspec": (build_v2(), ProxyHeader(2, ProxyCommand.PROXY, "UNSPEC")),
    "v2-unix": (
        V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x31, 216) + b"/a".ljust(216, b"\0"),
        ProxyHeader(2, ProxyCommand.PROXY, "UNIX"),
    ),
}


def feed_in_pieces(data: bytes, cuts: list[int]) -> tuple[ProxyHeader, bytes]:
    parser = HeaderParser()
    result = None
    start = 0
    for cut in [*cuts, len(data)]:
        piece = data[start:cut]
        start = cut
        if result is None:
            result = parser.feed(piece)
            leftover = parser.leftover
        else:
            leftover += piece
    assert result is not None
    return result, leftover


@pytest.mark.parametrize("name", list(HEADERS))
def test_every_header_in_every_two_piece_split(name):
    raw, expected = HEADERS[name]
    data = raw + SOCKS
    for cut in range(len(data) + 1):
        header, leftover = feed_in_pieces(data, [cut])
        assert header == expected, cut
        assert leftover == SOCKS, cut


@pytest.mark.parametrize("name", list(HEADERS))
def test_every_header_one_byte_at_a_time(name):
    raw, expected = HEADERS[name]
    header, leftover = feed_in_pieces(raw + SOCKS, list(range(1, len(raw) + len(SOCKS))))
    assert header == expected and leftover == SOCKS


def test_incomplete_headers_ask_for_more():
    for raw, _ in HEADERS.values():
        for end in range(len(raw)):
            assert HeaderParser().feed(raw[:end]) is None


def test_the_builders_agree_with_haproxy_spelling():
    assert build_v1(("203.0.113.5", 1), ("192.0.2.1", 2)) == (
        b"PROXY TCP4 203.0.113.5 192.0.2.1 1 2\r\n"
    )
    assert build_v2(("1.2.3.4", 1), ("5.6.7.8", 2)) == (
        V2_SIGNATURE + b"\x21\x11\x00\x0c\x01\x02\x03\x04\x05\x06\x07\x08\x00\x01\x00\x02"
    )


@pytest.mark.parametrize(
    "first",
    [SOCKS, b"GET / HTTP/1.1\r\n", b"\x05\x01\x00", b"PROXX", b"\r\n\r\n\x01", b"PROXYTCP4"],
)
def test_no_header_is_refused_as_soon_as_the_bytes_show_it(first):
    with pytest.raises(NoProxyHeader):
        parser = HeaderParser()
        for index in range(len(first)):
            parser.feed(first[index : index + 1])


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 203.0.113.5 192.0.2.1 40000\r\n",  # a field short
        b"PROXY TCP4 203.0.113.5 192.0.2.1 40000 1080 x\r\n",
        b"PROXY TCP4 2001:db8::5 192.0.2.1 40000 1080\r\n",  # v6 under TCP4
        b"PROXY TCP6 203.0.113.5 2001:db8::1 40000 1080\r\n",
        b"PROXY TCP4 203.0.113.05 192.0.2.1 40000 1080\r\n",
        b"PROXY TCP4 203.0.113.5 192.0.2.1 65536 1080\r\n",
        b"PROXY TCP4 203.0.113.5 192.0.2.1 040000 1080\r\n",
        b"PROXY TCP4 203.0.113.5 192.0.2.1 -1 1080\r\n",
        b"PROXY TCP4  203.0.113.5 192.0.2.1 1 1080\r\n",
        b"PROXY UDP4 203.0.113.5 192.0.2.1 1 1080\r\n",
        b"PROXY TCP4 203.0.113.5 192.0.2.1 1 1080\n",
        b"PROXY TCP4 203.0.113.5 192.0.2.1 1 1080\r\r\n",
    ],
)
def test_malformed_v1_lines(line):
    with pytest.raises(MalformedHeader):
        HeaderParser().feed(line)


def test_a_v1_line_without_its_end_is_refused_at_the_limit():
    parser = HeaderParser()
    assert parser.feed(b"PROXY UNKNOWN " + b"x" * (MAX_V1_LENGTH - 15)) is None
    with pytest.raises(MalformedHeader, match="longer than 107"):
        parser.feed(b"x")


def test_the_longest_v1_line_is_accepted():
    line = b"PROXY UNKNOWN " + b"x" * (MAX_V1_LENGTH - 16) + b"\r\n"
    assert len(line) == MAX_V1_LENGTH
    assert HeaderParser().feed(line) == ProxyHeader(1, ProxyCommand.PROXY, "UNKNOWN")


def v2(version_command: int, family: int, body: bytes, length: int = -1) -> bytes:
    size = len(body) if length < 0 else length
    return V2_SIGNATURE + struct.pack("!BBH", version_command, family, size) + body


@pytest.mark.parametrize(
    "raw, message",
    [
        (v2(0x11, 0x11, b"\0" * 12), "version 1"),
        (v2(0x22, 0x11, b"\0" * 12), "command 2"),
        (v2(0x21, 0x41, b"\0" * 12), "family"),
        (v2(0x21, 0x13, b"\0" * 12), "family"),
        (v2(0x21, 0x11, b"\0" * 11), "cannot hold"),
        (v2(0x21, 0x21, b"\0" * 35), "cannot hold"),
        (v2(0x21, 0x31, b"\0" * 215), "cannot hold"),
        (v2(0x21, 0x11, b"", MAX_V2_LENGTH + 1), "limit"),
    ],
)
def test_malformed_v2_headers_are_refused_before_their_body(raw, message):
    with pytest.raises(MalformedHeader, match=message):
        HeaderParser().feed(raw)


def test_the_longest_v2_header_is_accepted():
    raw = build_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=b"\0" * (MAX_V2_LENGTH - 12))
    assert HeaderParser().feed(raw + b"tail") is not None


def test_v2_udp_carries_no_tcp_client():
    header = HeaderParser().feed(v2(0x21, 0x12, b"\x01" * 12))
    assert header is not None and header.family == "UDP4" and not header.has_tcp_addresses


def test_the_parser_reads_no_further_than_its_header():
    parser = HeaderParser()
    raw, _ = HEADERS["v1-tcp4"]
    assert parser.feed(raw + SOCKS) is not None
    assert parser.leftover == SOCKS
    with pytest.raises(RuntimeError):
        parser.feed(b"more")
