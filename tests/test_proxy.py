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
    parse_v1_line,
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


# -- edges the mutation run found unchecked ----------------------------------------------


@pytest.mark.parametrize("port", [b"080", b"01", b"00", b"065535"])
def test_v1_port_with_a_leading_zero_is_malformed(port: bytes) -> None:
    line = b"PROXY TCP4 203.0.113.5 192.0.2.1 " + port + b" 1080\r\n"
    with pytest.raises(MalformedHeader, match=f"^PROXY v1 header with port {port!r}$"):
        HeaderParser().feed(line)


def test_v1_port_zero_is_a_port() -> None:
    header = HeaderParser().feed(b"PROXY TCP4 203.0.113.5 192.0.2.1 0 1080\r\n")
    assert header is not None and header.source == ("203.0.113.5", 0)


@pytest.mark.parametrize("port", [b"65536", b"99999", b"100000"])
def test_v1_port_above_65535_names_the_port(port: bytes) -> None:
    line = b"PROXY TCP4 203.0.113.5 192.0.2.1 40000 " + port + b"\r\n"
    with pytest.raises(MalformedHeader, match=f"^PROXY v1 header with port {port!r}$"):
        HeaderParser().feed(line)


@pytest.mark.parametrize("line", [b"PROXY", b"PROXI TCP4 1.2.3.4 1.2.3.5 1 2"])
def test_v1_line_without_the_proxy_word_and_a_family_is_malformed(line: bytes) -> None:
    with pytest.raises(MalformedHeader, match=r"^PROXY v1 line b'PROX"):
        parse_v1_line(line)


def test_v1_line_with_too_few_fields_is_quoted() -> None:
    with pytest.raises(MalformedHeader, match=r"^PROXY v1 line b'PROXY TCP4 1\.2\.3\.4'$"):
        parse_v1_line(b"PROXY TCP4 1.2.3.4")


@pytest.mark.parametrize("family", [b"TCP\xff", b"\xe9TCP4"])
def test_v1_non_ascii_family_is_malformed_and_quoted(family: bytes) -> None:
    with pytest.raises(MalformedHeader, match=r"^PROXY v1 header with protocol b'"):
        parse_v1_line(b"PROXY " + family + b" 1.2.3.4 1.2.3.5 1 2")
    try:
        parse_v1_line(b"PROXY " + family + b" 1.2.3.4 1.2.3.5 1 2")
    except MalformedHeader as error:
        assert repr(family) in str(error)


def test_v1_line_longer_than_the_limit_is_refused_even_with_its_crlf() -> None:
    line = b"PROXY UNKNOWN " + b"x" * MAX_V1_LENGTH + b"\r\n"
    with pytest.raises(MalformedHeader, match="longer than"):
        HeaderParser().feed(line)


def test_v1_header_ends_at_its_first_crlf() -> None:
    parser = HeaderParser()
    header = parser.feed(b"PROXY UNKNOWN\r\nGET / HTTP/1.0\r\n\r\n")
    assert header is not None and header.family == "UNKNOWN"
    assert parser.leftover == b"GET / HTTP/1.0\r\n\r\n"


def test_no_proxy_header_quotes_the_first_eight_bytes() -> None:
    with pytest.raises(NoProxyHeader) as v1:
        HeaderParser().feed(b"PRXY TCP4 1.2.3.4")
    assert str(v1.value) == "no PROXY header: the connection starts with b'PRXY TCP'"


def test_v2_unspec_without_addresses_is_exactly_the_fixed_part() -> None:
    assert build_v2() == V2_SIGNATURE + b"\x21\x00\x00\x00"
    assert build_v2(("192.0.2.1", 1), None) == V2_SIGNATURE + b"\x21\x00\x00\x00"
    assert build_v2(None, ("192.0.2.1", 1), local=True) == V2_SIGNATURE + b"\x20\x00\x00\x00"


def test_v2_ipv6_addresses_are_tcp6() -> None:
    data = build_v2(("2001:db8::5", 40000), ("2001:db8::1", 1080))
    assert data[13] == 0x21
    header = HeaderParser().feed(data)
    assert header == ProxyHeader(
        2, ProxyCommand.PROXY, "TCP6", ("2001:db8::5", 40000), ("2001:db8::1", 1080)
    )


@pytest.mark.parametrize("source", [None, ("192.0.2.5", 40000)])
def test_v2_builder_carries_tlvs_of_any_16_bit_length(source: tuple[str, int] | None) -> None:
    tlvs = b"\x00" * 40000
    data = build_v2(source, ("192.0.2.1", 1080) if source else None, tlvs=tlvs)
    assert struct.unpack_from("!H", data, 14)[0] == len(data) - 16
    assert data.endswith(tlvs)


def test_leftover_is_empty_before_any_header() -> None:
    assert HeaderParser().leftover == b""


def test_v1_line_with_a_bare_lf_says_so_exactly() -> None:
    with pytest.raises(MalformedHeader) as error:
        HeaderParser().feed(b"PROXY UNKNOWN\n")
    assert str(error.value) == "PROXY v1 line ends without CRLF"


@pytest.mark.parametrize(
    "family_protocol, family",
    [(0x10, "UNSPEC"), (0x20, "UNSPEC"), (0x12, "UDP4"), (0x22, "UDP6")],
)
def test_v2_inet_families_over_other_protocols_carry_no_tcp_addresses(family_protocol, family):
    body = b"\x00" * 36
    data = V2_SIGNATURE + struct.pack("!BBH", 0x21, family_protocol, len(body)) + body
    header = HeaderParser().feed(data)
    assert header == ProxyHeader(2, ProxyCommand.PROXY, family)


def test_v2_length_is_unsigned_16_bits() -> None:
    data = V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 0xFFFF)
    with pytest.raises(MalformedHeader) as error:
        HeaderParser().feed(data)
    assert str(error.value) == f"PROXY v2 header of 65535 bytes (limit {MAX_V2_LENGTH})"


@pytest.mark.parametrize(
    "data, first",
    [(b"\r\n\r\n\x00\r\nQXIT\n", b"\r\n\r\n\x00\r\nQ"), (b"GET / HTTP/1.0", b"GET / HT")],
)
def test_no_proxy_header_quotes_exactly_eight_bytes(data: bytes, first: bytes) -> None:
    with pytest.raises(NoProxyHeader) as error:
        HeaderParser().feed(data)
    assert str(error.value) == f"no PROXY header: the connection starts with {first!r}"


def test_feeding_a_complete_parser_says_so() -> None:
    parser = HeaderParser()
    parser.feed(b"PROXY UNKNOWN\r\n")
    with pytest.raises(RuntimeError) as error:
        parser.feed(b"x")
    assert str(error.value) == "the header is already complete"
