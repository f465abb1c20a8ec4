"""The SOCKS4/4A codec, with no Twisted in sight."""

import subprocess
import sys

import pytest

from socksident.socks4 import (
    REFUSALS,
    Command,
    FieldTooLong,
    IdentdMismatch,
    IdentdUnreachable,
    InvalidHostname,
    NotSocks4,
    ProtocolError,
    ReplyCode,
    Request,
    RequestParser,
    RequestRejectedOrFailed,
    SOCKS4Refusal,
    UnknownCommand,
    refusal_for,
    build_reply,
    build_request,
    parse_reply,
)

CONNECT = bytes([4, 1, 0x1F, 0x90, 192, 0, 2, 7]) + b"alice\x00"
CONNECT_4A = bytes([4, 1, 0, 80, 0, 0, 0, 1]) + b"bob\x00" + b"Example.COM\x00"


def feed_in_pieces(data: bytes, cuts: list[int]) -> tuple[RequestParser, list]:
    parser = RequestParser()
    results = []
    start = 0
    for cut in cuts + [len(data)]:
        results.append(parser.feed(data[start:cut]))
        start = cut
    return parser, results


@pytest.mark.parametrize("cut", range(1, len(CONNECT)))
def test_every_split_of_a_socks4_request(cut):
    parser, results = feed_in_pieces(CONNECT, [cut])
    assert results[0] is None
    assert results[1] == Request(Command.CONNECT, 8080, "192.0.2.7", "alice")
    assert parser.leftover == b""


@pytest.mark.parametrize("cut", range(1, len(CONNECT_4A)))
def test_every_split_of_a_socks4a_request(cut):
    _, results = feed_in_pieces(CONNECT_4A, [cut])
    assert results[0] is None
    request = results[1]
    assert request == Request(Command.CONNECT, 80, "0.0.0.1", "bob", "example.com")
    assert request.is_socks4a and request.destination == "example.com"


def test_one_byte_at_a_time():
    parser = RequestParser()
    outcomes = [parser.feed(bytes([b])) for b in CONNECT_4A]
    assert outcomes[:-1] == [None] * (len(CONNECT_4A) - 1)
    assert outcomes[-1].hostname == "example.com"


def test_bytes_after_the_request_are_kept_in_order():
    parser = RequestParser()
    request = parser.feed(CONNECT + b"GET / HTTP/1.0\r\n")
    assert request.user_id == "alice"
    assert parser.leftover == b"GET / HTTP/1.0\r\n"
    assert parser.feed(b"more") is request
    assert parser.leftover == b"GET / HTTP/1.0\r\nmore"


def test_bind_command_and_empty_user():
    request = RequestParser().feed(bytes([4, 2, 0, 21, 10, 1, 2, 3, 0]))
    assert request == Request(Command.BIND, 21, "10.1.2.3", "")


def test_dstip_zero_is_plain_socks4_not_4a():
    """0.0.0.0 has x == 0, so no host name follows."""
    request = RequestParser().feed(bytes([4, 1, 0, 80, 0, 0, 0, 0]) + b"u\x00")
    assert request is not None and request.hostname is None


def test_user_id_keeps_every_octet():
    request = RequestParser().feed(bytes([4, 1, 0, 80, 1, 2, 3, 4]) + b"\xe9t\xe9\x00")
    assert request.user_id == "\xe9t\xe9"


@pytest.mark.parametrize(
    "data, kind",
    [
        (b"\x05\x01\x00", NotSocks4),
        (b"GET / HTTP/1.1\r\n", NotSocks4),
        (bytes([4, 3]), UnknownCommand),
        (bytes([4, 0]), UnknownCommand),
        (bytes([4, 1, 0, 80, 1, 2, 3, 4]) + b"u" * 256, FieldTooLong),
        (bytes([4, 1, 0, 80, 1, 2, 3, 4]) + b"u" * 256 + b"\x00", FieldTooLong),
        (bytes([4, 1, 0, 80, 0, 0, 0, 9]) + b"u\x00" + b"a" * 256, FieldTooLong),
        (bytes([4, 1, 0, 80, 0, 0, 0, 9]) + b"u\x00" + b"a" * 256 + b"\x00", FieldTooLong),
        (bytes([4, 1, 0, 80, 0, 0, 0, 9]) + b"u\x00bad name\x00", InvalidHostname),
        (bytes([4, 1, 0, 80, 0, 0, 0, 9]) + b"u\x00\x00", InvalidHostname),
        (bytes([4, 1, 0, 80, 0, 0, 0, 9]) + b"u\x00-a.com\x00", InvalidHostname),
        (bytes([4, 1, 0, 80, 0, 0, 0, 9]) + b"u\x00a..com\x00", InvalidHostname),
    ],
)
def test_errors(data, kind):
    with pytest.raises(kind) as raised:
        RequestParser().feed(data)
    expected_reply = None if kind is NotSocks4 else ReplyCode.REJECTED
    assert raised.value.reply == expected_reply
    assert raised.value.reason


def test_limits_are_settings():
    parser = RequestParser(max_user_id_length=3)
    with pytest.raises(FieldTooLong, match="longer than 3"):
        parser.feed(bytes([4, 1, 0, 80, 1, 2, 3, 4]) + b"abcd")
    assert RequestParser(max_user_id_length=3).feed(
        bytes([4, 1, 0, 80, 1, 2, 3, 4]) + b"abc\x00"
    ).user_id == "abc"


def test_limit_exactly_255_is_accepted():
    name = ".".join(["a" * 63] * 4)[:255].rstrip(".")
    data = bytes([4, 1, 0, 80, 0, 0, 0, 1]) + b"u" * 255 + b"\x00" + name.encode() + b"\x00"
    request = RequestParser().feed(data)
    assert len(request.user_id) == 255 and request.hostname == name


def test_not_socks4_carries_first_bytes():
    with pytest.raises(NotSocks4) as raised:
        RequestParser().feed(b"\x05\x02\x00\x02")
    assert raised.value.first_bytes == b"\x05\x02\x00\x02"


def test_reply_is_eight_bytes():
    assert build_reply(ReplyCode.GRANTED, 8080, "10.0.0.1") == bytes(
        [0, 90, 0x1F, 0x90, 10, 0, 0, 1]
    )
    assert build_reply(ReplyCode.IDENT_MISMATCH) == bytes([0, 93, 0, 0, 0, 0, 0, 0])
    assert parse_reply(build_reply(ReplyCode.IDENTD_UNREACHABLE, 1, "1.2.3.4")) == (
        92,
        1,
        "1.2.3.4",
    )
    with pytest.raises(ValueError):
        parse_reply(b"\x00\x5a")


def test_build_request_round_trips():
    assert build_request(Command.CONNECT, 8080, "192.0.2.7", "alice") == CONNECT
    data = build_request(Command.CONNECT, 80, "", "bob", hostname="Example.COM")
    assert data == CONNECT_4A


@pytest.mark.parametrize("bad", ["127.1", "1.2.3.4 junk", "::1", "256.0.0.1"])
def test_reply_addresses_must_be_dotted_quads(bad):
    with pytest.raises(ValueError, match="dotted-quad"):
        build_reply(ReplyCode.GRANTED, 1, bad)


# -- the refusal tree ---------------------------------------------------------


@pytest.mark.parametrize(
    "cls, code",
    [
        (RequestRejectedOrFailed, ReplyCode.REJECTED),
        (IdentdUnreachable, ReplyCode.IDENTD_UNREACHABLE),
        (IdentdMismatch, ReplyCode.IDENT_MISMATCH),
    ],
)
def test_each_refusal_carries_its_code_and_reason(cls, code):
    refusal = cls("why")
    assert isinstance(refusal, SOCKS4Refusal)
    assert (refusal.code, refusal.reason, str(refusal)) == (code, "why", "why")
    assert REFUSALS[code] is cls
    made = refusal_for(code, "because")
    assert type(made) is cls and made.reason == "because"


def test_the_table_covers_every_refusing_code_and_not_90():
    assert set(REFUSALS) == set(ReplyCode) - {ReplyCode.GRANTED}
    with pytest.raises(KeyError):
        refusal_for(ReplyCode.GRANTED, "granted is no refusal")


@pytest.mark.parametrize("cls", [UnknownCommand, FieldTooLong, InvalidHostname])
def test_codec_errors_owing_a_reply_are_91_refusals(cls):
    error = cls("bad")
    assert isinstance(error, RequestRejectedOrFailed) and isinstance(error, ProtocolError)
    assert error.code is ReplyCode.REJECTED and error.reply is ReplyCode.REJECTED


def test_not_socks4_is_outside_the_tree():
    error = NotSocks4("version 5", b"\x05")
    assert isinstance(error, ProtocolError) and not isinstance(error, SOCKS4Refusal)
    assert error.reply is None


def test_bind_finding_no_port_is_a_91_refusal():
    from socksident.bind import NoFreePort

    assert issubclass(NoFreePort, RequestRejectedOrFailed)


def test_codec_imports_no_twisted():
    code = (
        "import sys, socksident.socks4; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'twisted'); "
        "sys.exit(str(bad) if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _hostname(length: int) -> bytes:
    """A valid host name of exactly `length` bytes (labels of at most 63)."""
    labels, left = [], length
    while left > 0:
        size = min(63, left if left <= 63 else left - 2)
        labels.append(b"h" * size)
        left -= size + 1
    return b".".join(labels)


@pytest.mark.parametrize("length", range(240, 256))
def test_userid_at_the_limit_split_before_its_nul(length):
    parser = RequestParser()
    assert parser.feed(bytes([4, 1, 0, 80, 1, 2, 3, 4]) + b"u" * length) is None
    assert parser.buffered == 8 + length
    assert parser.feed(b"\x00").user_id == "u" * length


def test_userid_one_past_the_limit_is_refused_before_its_nul():
    parser = RequestParser()
    assert parser.feed(bytes([4, 1, 0, 80, 1, 2, 3, 4]) + b"u" * 255) is None
    with pytest.raises(FieldTooLong, match="USERID longer than 255"):
        parser.feed(b"u")


@pytest.mark.parametrize("length", range(240, 256))
def test_socks4a_name_at_the_limit_split_before_its_nul(length):
    name = _hostname(length)
    assert len(name) == length
    parser = RequestParser()
    assert parser.feed(bytes([4, 1, 0, 80, 0, 0, 0, 1]) + b"u\x00" + name) is None
    request = parser.feed(b"\x00")
    assert request.hostname == name.decode()


def test_socks4a_name_one_past_the_limit_is_refused_before_its_nul():
    parser = RequestParser()
    assert parser.feed(bytes([4, 1, 0, 80, 0, 0, 0, 1]) + b"u\x00" + _hostname(255)) is None
    with pytest.raises(FieldTooLong, match="host name longer than 255"):
        parser.feed(b"h")


@pytest.mark.parametrize("marker", [bytes([1, 2, 3, 4]), bytes([0, 0, 0, 1])], ids=["4", "4a"])
def test_early_data_holding_nuls_stays_leftover(marker):
    name = b"example.com\x00" if marker[:3] == b"\x00\x00\x00" else b""
    early = b"GET\x00 /\x00\x00x"
    parser = RequestParser()
    request = parser.feed(bytes([4, 1, 0, 80]) + marker + b"alice\x00" + name + early)
    assert request.user_id == "alice"
    assert request.hostname == (name[:-1].decode() if name else None)
    assert parser.leftover == early and parser.buffered == 0


@pytest.mark.parametrize(
    "host, announced",
    [("192.0.2.7", "192.0.2.7"), ("2001:db8::7", "0.0.0.0"), ("::ffff:192.0.2.7", "192.0.2.7"),
     ("::", "0.0.0.0")],
)
def test_reply_address_holds_ipv4_only(host, announced):
    from socksident.socks4 import reply_address

    assert reply_address(host) == announced


# The field limits hold the same whether the NUL comes in the same read or a
# later one: a field of exactly the limit waits for its NUL, one byte more is
# refused before it arrives.
HEADER = bytes([4, 1, 0x1F, 0x90, 192, 0, 2, 7])
HEADER_4A = bytes([4, 1, 0, 80, 0, 0, 0, 1])
LONGEST_NAME = b".".join([b"a" * 63] * 4)  # 255 bytes, labels of 63


def test_user_id_of_the_limit_waits_for_its_nul_in_a_later_read():
    parser = RequestParser()
    assert parser.feed(HEADER + b"u" * 255) is None
    request = parser.feed(b"\x00")
    assert request is not None and request.user_id == "u" * 255


def test_user_id_one_past_the_limit_is_refused_before_its_nul():
    parser = RequestParser()
    assert parser.feed(HEADER + b"u" * 255) is None
    with pytest.raises(FieldTooLong):
        parser.feed(b"u")


def test_user_id_limit_is_the_parsers_own_while_the_nul_is_missing():
    parser = RequestParser(max_user_id_length=4)
    assert parser.feed(HEADER + b"abcd") is None
    with pytest.raises(FieldTooLong):
        parser.feed(b"e")


def test_hostname_of_the_limit_waits_for_its_nul_in_a_later_read():
    assert len(LONGEST_NAME) == 255
    parser = RequestParser()
    assert parser.feed(HEADER_4A + b"bob\x00" + LONGEST_NAME) is None
    request = parser.feed(b"\x00")
    assert request is not None and request.hostname == LONGEST_NAME.decode()


def test_hostname_one_past_the_limit_is_refused_before_its_nul():
    parser = RequestParser()
    assert parser.feed(HEADER_4A + b"bob\x00" + LONGEST_NAME) is None
    with pytest.raises(FieldTooLong):
        parser.feed(b"a")


def test_hostname_of_the_limit_in_one_read_is_accepted_and_one_more_is_not():
    request = RequestParser().feed(HEADER_4A + b"bob\x00" + LONGEST_NAME + b"\x00")
    assert request is not None and request.hostname == LONGEST_NAME.decode()
    with pytest.raises(FieldTooLong):
        RequestParser().feed(HEADER_4A + b"bob\x00" + LONGEST_NAME + b"a\x00")


def test_hostname_limit_is_the_parsers_own():
    parser = RequestParser(max_hostname_length=3)
    assert parser.feed(HEADER_4A + b"bob\x00abc") is None
    with pytest.raises(FieldTooLong):
        parser.feed(b"d")
    with pytest.raises(FieldTooLong):
        RequestParser(max_hostname_length=3).feed(HEADER_4A + b"bob\x00abcd\x00")


def test_early_data_with_a_nul_after_a_socks4a_request_stays_early_data():
    parser = RequestParser()
    request = parser.feed(CONNECT_4A + b"GET\x00/\x00")
    assert request is not None
    assert request.user_id == "bob"
    assert request.hostname == "example.com"
    assert parser.leftover == b"GET\x00/\x00"


def test_early_data_with_a_nul_after_a_socks4_request_stays_early_data():
    parser = RequestParser()
    request = parser.feed(CONNECT + b"\x00x\x00")
    assert request is not None and request.user_id == "alice"
    assert parser.leftover == b"\x00x\x00"


@pytest.mark.parametrize("first", [b"G", b"G/", b"P ", b"C1"])
def test_one_letter_is_enough_to_answer_as_to_an_http_client(first):
    from socksident.socks4 import HTTP_NOT_A_WEB_PROXY, foreign_protocol_answer

    assert foreign_protocol_answer(first) == (HTTP_NOT_A_WEB_PROXY, "what looks like HTTP")


def test_a_short_reply_is_named_by_its_length():
    with pytest.raises(ValueError, match="^a reply is 8 bytes, got 7$"):
        parse_reply(b"\x00" * 7)


def test_build_request_without_a_user_id_sends_an_empty_one():
    assert build_request(Command.CONNECT, 80, "192.0.2.7") == bytes([4, 1, 0, 80, 192, 0, 2, 7, 0])


def test_leftover_is_empty_before_the_request():
    assert RequestParser().leftover == b""


def test_not_socks4_keeps_the_first_16_bytes():
    with pytest.raises(NotSocks4) as error:
        RequestParser().feed(b"\x05" + b"x" * 30)
    assert error.value.first_bytes == b"\x05" + b"x" * 15


def test_only_one_trailing_dot_is_dropped_from_a_host_name():
    with pytest.raises(InvalidHostname):
        RequestParser().feed(HEADER_4A + b"bob\x00a.b..\x00")


def test_a_trailing_dot_is_all_that_is_stripped_from_a_host_name():
    request = RequestParser().feed(HEADER_4A + b"bob\x00BOX.\x00")
    assert request is not None and request.hostname == "box"
