"""The RFC 1413 codec, without Twisted and without I/O."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from socksident.ident import (
    MAX_RESPONSE_LINE,
    IdentAnswer,
    IdentOutcome,
    MalformedResponse,
    ResponseReader,
    build_query,
    parse_response,
)

# The RFC's own example: the querying side sees "23, 6191" and asks "6191, 23".
CLIENT_PORT = 6191
SERVER_PORT = 23


def parse(line: bytes) -> IdentAnswer:
    return parse_response(line, CLIENT_PORT, SERVER_PORT)


def user(user_id: str, opsys: str = "UNIX", charset: str | None = None) -> IdentAnswer:
    return IdentAnswer(IdentOutcome.USER, user_id=user_id, opsys=opsys, charset=charset)


def test_codec_imports_no_twisted() -> None:
    root = Path(__file__).resolve().parent.parent
    code = (
        "import sys, socksident.ident; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'twisted'); "
        "sys.exit(str(bad) if bad else 0)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


# build_query


def test_query_puts_client_port_first() -> None:
    assert build_query(6191, 23) == b"6191 , 23\r\n"


def test_query_other_ports() -> None:
    assert build_query(40000, 1080) == b"40000 , 1080\r\n"


@pytest.mark.parametrize("ports", [(0, 23), (6191, 0), (65536, 23), (6191, -1)])
def test_query_rejects_impossible_ports(ports: tuple[int, int]) -> None:
    with pytest.raises(ValueError):
        build_query(*ports)


# parse_response: what must be accepted


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"6191 , 23 : USERID : UNIX : alice", user("alice")),
        (b"6191,23:USERID:UNIX:alice", user("alice")),
        (b"6191 , 23 : USERID : UNIX , US-ASCII : alice", user("alice", charset="US-ASCII")),
        (b"6191,23:USERID:UNIX,UTF-8:alice", user("alice", charset="UTF-8")),
        (
            b"\t6191\t,\t23\t:\tUSERID\t:\tUNIX\t,\tUS-ASCII\t:\talice\t",
            user("alice", charset="US-ASCII"),
        ),
        (b"   6191   ,   23   :   USERID   :   UNIX   :   alice   ", user("alice")),
        (b"6191 , 23 : USERID : OTHER : a:b: c", user("a:b: c", opsys="OTHER")),
        (b"6191 , 23 : USERID : OTHER : 0x3f2a:audit token", user("0x3f2a:audit token", "OTHER")),
        (b"6191 , 23 : USERID : UNIX : al ice", user("al ice")),
        (b"6191 , 23 : USERID : UNIX : j\xf6rg", user("j\xf6rg")),
        # only spaces and tabs are trimmed, not every white space character
        (b"6191 , 23 : USERID : UNIX : \xa0alice\x0b", user("\xa0alice\x0b")),
        (b"6191 , 23 : USERID : WIN32 : Root", user("Root", opsys="WIN32")),
    ],
)
def test_userid_replies(line: bytes, expected: IdentAnswer) -> None:
    assert parse(line) == expected


@pytest.mark.parametrize(
    "error", ["INVALID-PORT", "NO-USER", "HIDDEN-USER", "UNKNOWN-ERROR"]
)
def test_each_rfc_error_type(error: str) -> None:
    answer = parse(b"6191 , 23 : ERROR : " + error.encode())
    assert answer == IdentAnswer(IdentOutcome.ERROR, error=error)
    assert not answer.usable


@pytest.mark.parametrize("error", ["X-DENIED", "XY", "X" + "Z" * 63])
def test_private_error_types(error: str) -> None:
    assert parse(b"6191,23:ERROR:" + error.encode()).error == error


def test_error_with_blanks_around() -> None:
    answer = parse(b" 6191 ,\t23 :\tERROR\t: NO-USER \t")
    assert answer.outcome is IdentOutcome.ERROR
    assert answer.error == "NO-USER"


def test_limits_are_inclusive() -> None:
    opsys = "O" * 64
    assert parse(b"6191,23:USERID:" + opsys.encode() + b":u").opsys == opsys
    long_id = "u" * 512
    assert parse(b"6191,23:USERID:UNIX:" + long_id.encode()).user_id == long_id


def test_five_digit_ports() -> None:
    answer = parse_response(b"65535 , 10800 : USERID : UNIX : bob", 65535, 10800)
    assert answer.user_id == "bob"


# parse_response: what must be refused


@pytest.mark.parametrize(
    "line, message",
    [
        # the wrong port pair, including the pair the wrong way round
        (b"23 , 6191 : USERID : UNIX : alice", "reply is for ports 23 , 6191"),
        (b"6192 , 23 : USERID : UNIX : alice", "reply is for ports 6192 , 23"),
        (b"6191 , 24 : ERROR : NO-USER", "reply is for ports 6191 , 24"),
        # missing fields
        (b"", "too few fields"),
        (b"6191 , 23", "too few fields"),
        (b"6191 , 23 : USERID", "too few fields"),
        (b"6191 , 23 : ERROR", "too few fields"),
        (b"6191 , 23 : USERID : UNIX", "without a user id"),
        (b"6191 : USERID : UNIX : alice", "no port pair"),
        (b"6191 , 23 , 5 : USERID : UNIX : alice", "no port pair"),
        (b" , 23 : USERID : UNIX : alice", "invalid port"),
        (b"6191 , 23 : USERID :  : alice", "empty opsys"),
        (b"6191 , 23 : USERID : UNIX , : alice", "empty charset"),
        (b"6191 , 23 : USERID : UNIX , A , B : alice", "more than one comma"),
        (b"6191 , 23 : ERROR : ", "empty error type"),
        # unknown types
        (b"6191 , 23 : ERROR : NOT-A-TYPE", "unknown error type"),
        (b"6191 , 23 : ERROR : no-user", "unknown error type"),
        (b"6191 , 23 : ERROR : X", "unknown error type"),
        (b"6191 , 23 : ERROR : X-A:B", "colon in the ERROR type"),
        (b"6191 , 23 : USER : UNIX : alice", "unknown reply type"),
        (b"6191 , 23 : userid : UNIX : alice", "unknown reply type"),
        # empty user id
        (b"6191 , 23 : USERID : UNIX :", "empty user id"),
        (b"6191 , 23 : USERID : UNIX : \t  ", "empty user id"),
        # too long
        (b"6191 , 23 : USERID : " + b"O" * 65 + b" : alice", "opsys longer than 64"),
        (b"6191 , 23 : USERID : UNIX , " + b"C" * 65 + b" : alice", "charset longer than 64"),
        (b"6191 , 23 : ERROR : X" + b"Z" * 64, "error type longer than 64"),
        (b"6191 , 23 : USERID : UNIX : " + b"u" * 513, "user id longer than 512"),
        # bad ports
        (b"61a1 , 23 : USERID : UNIX : alice", "invalid port '61a1'"),
        (b"6191 , -23 : USERID : UNIX : alice", "invalid port '-23'"),
        (b"61 91 , 23 : USERID : UNIX : alice", "invalid port '61 91'"),
        (b"006191 , 23 : USERID : UNIX : alice", "invalid port '006191'"),
        (b"6191 , 100023 : USERID : UNIX : alice", "invalid port '100023'"),
        # bytes a line may not hold
        (b"6191 , 23 : USERID : UN IX : alice", "invalid opsys"),
        (b"6191 , 23 : USERID : UNIX : al\x00ice", "NUL in the user id"),
        (b"6191 , 23 : USERID : UNIX : al\rice", "CR or LF"),
        (b"6191 , 23 : USERID : UNIX : alice" + b" " * MAX_RESPONSE_LINE, "longer than"),
    ],
)
def test_malformed_replies(line: bytes, message: str) -> None:
    with pytest.raises(MalformedResponse, match=message.replace("(", r"\(")):
        parse(line)


def test_malformed_is_caught_as_a_value_error() -> None:
    with pytest.raises(ValueError, match="invalid port"):
        parse(b"61a1 , 23 : USERID : UNIX : alice")


# ResponseReader

GOOD = b"6191 , 23 : USERID : UNIX : alice\r\n"
ALICE = user("alice")


@pytest.mark.parametrize(
    "data, split",
    [
        (line + ending, split)
        for line in [GOOD[:-2]]
        for ending in (b"\r\n", b"\n")
        for split in range(len(line + ending))
    ],
)
def test_reader_every_split_point(data: bytes, split: int) -> None:
    reader = ResponseReader(CLIENT_PORT, SERVER_PORT)
    assert reader.feed(data[:split]) is None
    assert reader.feed(data[split:]) == ALICE
    assert reader.answer == ALICE
    reader.connection_closed()  # a complete line was seen: no complaint


@pytest.mark.parametrize("ending", [b"\r\n", b"\n"])
def test_reader_byte_by_byte(ending: bytes) -> None:
    data = GOOD[:-2] + ending
    reader = ResponseReader(CLIENT_PORT, SERVER_PORT)
    results = [reader.feed(data[i : i + 1]) for i in range(len(data))]
    assert results[:-1] == [None] * (len(data) - 1)
    assert results[-1] == ALICE


def test_reader_cr_alone_is_not_a_line_ending() -> None:
    reader = ResponseReader(CLIENT_PORT, SERVER_PORT)
    assert reader.feed(GOOD[:-1]) is None
    assert reader.feed(b"\n") == ALICE


def test_reader_strips_exactly_one_cr() -> None:
    reader = ResponseReader(CLIENT_PORT, SERVER_PORT)
    with pytest.raises(MalformedResponse, match="CR or LF"):
        reader.feed(GOOD[:-2] + b"\r\r\n")


def test_reader_ignores_bytes_after_the_line() -> None:
    reader = ResponseReader(CLIENT_PORT, SERVER_PORT)
    assert reader.feed(GOOD + b"6191 , 23 : USERID : UNIX : mallory\r\n") == ALICE
    assert reader.feed(b"more garbage") == ALICE


def test_reader_reports_malformed_line() -> None:
    reader = ResponseReader(CLIENT_PORT, SERVER_PORT)
    assert reader.feed(b"6191 , 24 : USERID : UNIX : alice") is None
    with pytest.raises(MalformedResponse, match="6191 , 24"):
        reader.feed(b"\r\n")


def test_reader_gives_up_after_1000_bytes_without_line_ending() -> None:
    reader = ResponseReader(CLIENT_PORT, SERVER_PORT)
    assert reader.feed(b"x" * MAX_RESPONSE_LINE) is None
    with pytest.raises(MalformedResponse, match="more than 1000 bytes"):
        reader.feed(b"x")


def test_reader_gives_up_on_one_long_chunk() -> None:
    reader = ResponseReader(CLIENT_PORT, SERVER_PORT)
    with pytest.raises(MalformedResponse, match="more than 1000 bytes"):
        reader.feed(b"6191 , 23 : USERID : UNIX : " + b"a" * 2000 + b"\r\n")


def test_reader_line_of_exactly_1000_bytes_is_read() -> None:
    line = b"6191 , 23 : USERID : UNIX : alice"
    line += b" " * (MAX_RESPONSE_LINE - len(line))
    reader = ResponseReader(CLIENT_PORT, SERVER_PORT)
    assert reader.feed(line) is None
    assert reader.feed(b"\n") == ALICE


def test_reader_premature_close() -> None:
    reader = ResponseReader(CLIENT_PORT, SERVER_PORT)
    reader.feed(GOOD[:-2])
    with pytest.raises(MalformedResponse, match="connection closed before a complete line"):
        reader.connection_closed()


def test_reader_close_without_any_bytes() -> None:
    reader = ResponseReader(CLIENT_PORT, SERVER_PORT)
    with pytest.raises(MalformedResponse, match="connection closed before a complete line"):
        reader.connection_closed()


@pytest.mark.parametrize("ports", [(1, 65535), (65535, 1), (1, 1), (65535, 65535)])
def test_query_accepts_the_edges_of_the_port_range(ports: tuple[int, int]) -> None:
    assert build_query(*ports) == b"%d , %d\r\n" % ports


@pytest.mark.parametrize("first", [b"\n", b"\r\n", b"\nlater line\n"])
def test_an_empty_first_line_is_malformed(first: bytes) -> None:
    with pytest.raises(MalformedResponse, match="too few fields"):
        ResponseReader(CLIENT_PORT, SERVER_PORT).feed(first)


def test_lf_inside_the_line_given_to_the_parser() -> None:
    with pytest.raises(MalformedResponse, match="CR or LF"):
        parse(b"6191 , 23 : USERID : UNIX : al\nice")


def test_only_spaces_and_tabs_are_trimmed_from_the_user_id() -> None:
    assert parse(b"6191 , 23 : USERID : UNIX :\x0b\x0calice\xa0 \t") == user("\x0b\x0calice\xa0")


@pytest.mark.parametrize(
    "line, message",
    [
        (b"6191\x0b, 23 : USERID : UNIX : alice", "invalid port"),
        (b"6191 ,\x0c23 : USERID : UNIX : alice", "invalid port"),
        (b"6191 , 23 :\x0bUSERID : UNIX : alice", "unknown reply type"),
        (b"6191 , 23 : USERID :\x0cUNIX : alice", "invalid opsys"),
        (b"6191 , 23 : USERID : UNIX ,\x0bUTF-8 : alice", "invalid charset"),
        (b"6191 , 23 : ERROR :\x0bNO-USER", "invalid error type"),
    ],
)
def test_other_whitespace_around_tokens_is_malformed(line: bytes, message: str) -> None:
    with pytest.raises(MalformedResponse, match=message):
        parse(line)


@pytest.mark.parametrize("port", [0, 65536])
def test_query_names_the_port_out_of_range(port: int) -> None:
    with pytest.raises(ValueError, match=f"^port {port} is not in 1-65535$"):
        build_query(port, 23)


def test_a_long_malformed_reply_is_quoted_to_80_bytes() -> None:
    line = b"x" * 81
    with pytest.raises(MalformedResponse) as long_reply:
        parse(line)
    assert str(long_reply.value) == "too few fields in " + repr(b"x" * 80) + "..."
    with pytest.raises(MalformedResponse) as short_reply:
        parse(b"x" * 80)
    assert str(short_reply.value) == "too few fields in " + repr(b"x" * 80)


def test_the_reader_holds_nothing_once_it_has_its_answer() -> None:
    reader = ResponseReader(CLIENT_PORT, SERVER_PORT)
    assert reader.feed(b"6191 , 23 : USERID : UNIX : alice\r\n") == user("alice")
    assert reader.buffered == 0


def test_an_invalid_port_is_quoted_with_all_but_spaces_and_tabs() -> None:
    with pytest.raises(MalformedResponse) as error:
        parse(b" 6191\x0b\t, 23 : USERID : UNIX : alice")
    assert str(error.value) == "invalid port '6191\\x0b'"


@pytest.mark.parametrize(
    "line, message",
    [
        (b"6191 , 23 : USERID : UNIX : al\rice", "CR or LF inside the reply line"),
        (b"6191 , 23 : ERROR : NO-USER : x", "colon in the ERROR type"),
    ],
)
def test_malformed_reply_messages_exactly(line: bytes, message: str) -> None:
    with pytest.raises(MalformedResponse) as error:
        parse(line)
    assert str(error.value) == message


@pytest.mark.parametrize(
    "line, message",
    [
        (b"6191 , 23 : USERID : UNIX :  \t", "empty user id"),
        (b"6191 , 23 : USERID : UNIX : al\x00ice", "NUL in the user id"),
        (b"6191 , 23 : USERID : UNIX", "USERID reply without a user id field"),
        (b"6191 , 23 : USERID : UNIX , UTF-8 , X : alice", "more than one comma in the OPSYS field"),
    ],
)
def test_more_malformed_reply_messages_exactly(line: bytes, message: str) -> None:
    with pytest.raises(MalformedResponse) as error:
        parse(line)
    assert str(error.value) == message
