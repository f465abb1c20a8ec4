"""The access record as a value: its text line and its fields, without a server."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Optional

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEventAsClassicLogText

from socksident.accesslog import (
    ACCESS_NAMESPACE,
    FIELDS,
    AccessRecord,
    access_fields,
    emit,
    ident_summary,
)
from socksident.connection import ConnectionInfo
from socksident.ident import IdentAnswer, IdentOutcome
from socksident.policy import Decision
from socksident.socks4 import Command, ReplyCode, Request, RequestRejectedOrFailed

INFO = ConnectionInfo("10.0.0.5", 40000, "10.0.0.1", 1080, "10.0.0.1", 1080)


def record(**changes: Any) -> AccessRecord:
    values: dict[str, Any] = dict(
        connection=INFO,
        request=Request(Command.CONNECT, 80, "192.0.2.7", "alice"),
        decision=Decision(ReplyCode.GRANTED, "permitted by r.conf:3", "r.conf:3"),
        ident=None,
        replies=(ReplyCode.GRANTED,),
        reason="permitted by r.conf:3",
        refusal=None,
        address="192.0.2.7",
        bytes_up=10,
        bytes_down=2000,
        started=1000.0,
        duration=1.5,
    )
    values.update(changes)
    return AccessRecord(**values)


def test_summary_is_the_access_line() -> None:
    assert record().summary() == (
        "10.0.0.5:40000 user='alice' ident=- CONNECT 192.0.2.7:80 -> 90"
        " (permitted by r.conf:3) up=10 down=2000 in 1.500s"
    )


def test_a_side_cut_off_after_its_linger_is_in_the_line_and_the_fields() -> None:
    cut = record(cut_off="remote", dropped=4096, bytes_up=9000)
    assert cut.summary() == (
        "10.0.0.5:40000 user='alice' ident=- CONNECT 192.0.2.7:80 -> 90"
        " (permitted by r.conf:3) up=9000 down=2000 in 1.500s cut-off=remote dropped=4096"
    )
    assert (cut.fields()["cut_off"], cut.fields()["dropped"]) == ("remote", 4096)


def test_summary_shows_the_address_a_name_reached() -> None:
    named = record(request=Request(Command.CONNECT, 443, "0.0.0.1", "bob", "www.example.com"))
    assert " CONNECT www.example.com:443 [192.0.2.7] -> 90 " in named.summary()


def test_summary_of_a_connection_that_never_sent_a_request() -> None:
    silent = record(request=None, decision=None, replies=(), reason="no complete request within 30 s")
    assert silent.summary().startswith(
        "10.0.0.5:40000 (no valid request) -> - (no complete request within 30 s)"
    )
    assert silent.code is None and silent.fields()["code"] is None


def test_a_bind_with_only_its_first_reply_was_never_settled() -> None:
    bind = record(
        request=Request(Command.BIND, 21, "192.0.2.7", "alice"),
        replies=(ReplyCode.GRANTED,),
        address=None,
    )
    assert bind.code is None
    assert bind.fields()["replies"] == [90] and bind.fields()["code"] is None
    both = record(
        request=Request(Command.BIND, 21, "192.0.2.7", "alice"),
        replies=(ReplyCode.GRANTED, ReplyCode.REJECTED),
    )
    assert both.code is ReplyCode.REJECTED


def test_fields_are_the_one_schema_and_json_ready() -> None:
    answer = IdentAnswer(IdentOutcome.USER, user_id="alice", opsys="UNIX", duration=0.25)
    refused = record(
        ident=answer,
        replies=(ReplyCode.REJECTED,),
        refusal=RequestRejectedOrFailed("connect failed"),
        reason="connect failed",
        address=None,
        bytes_up=0,
        bytes_down=0,
    )
    fields = refused.fields()
    assert fields == {
        "time": 1000.0,
        "client": "10.0.0.5:40000",
        "listener": "10.0.0.1:1080",
        "via": None,
        "user": "alice",
        "command": "CONNECT",
        "destination": "192.0.2.7",
        "port": 80,
        "address": None,
        "next_hop": None,
        "code": 91,
        "replies": [91],
        "reason": "connect failed",
        "refusal": "RequestRejectedOrFailed",
        "rule": "r.conf:3",
        "ident": "user:'alice'",
        "ident_outcome": "user",
        "ident_user": "alice",
        "ident_opsys": "UNIX",
        "ident_error": None,
        "ident_duration": 0.25,
        "time_to_grant": None,
        "bytes_up": 0,
        "bytes_down": 0,
        "duration": 1.5,
        "cut_off": None,
        "dropped": 0,
        "next_hop_reply": None,
        "relay": None,
    }
    assert json.loads(json.dumps(fields)) == fields


@dataclass
class Chain:
    """What `AccessRecord.of` reads from a finished chain."""

    decision: Optional[Decision] = None
    ident_answer: Optional[IdentAnswer] = None
    destination_address: Optional[str] = None
    next_hop_name: Optional[str] = None
    hop_reply: Optional[str] = None


@dataclass
class Counts:
    """What `AccessRecord.of` reads from a finished relay."""

    bytes_up: int = 0
    bytes_down: int = 0
    cut_off: Optional[str] = None
    dropped: int = 0
    mode: str = "splice"


def test_a_record_of_a_chain_and_a_relay_takes_every_count_from_them() -> None:
    answer = IdentAnswer(IdentOutcome.USER, user_id="alice")
    decision = Decision(ReplyCode.GRANTED, "permitted by r.conf:3", "r.conf:3")
    chain = Chain(decision, answer, "192.0.2.7", "hop.example:1080", "90")
    relay = Counts(bytes_up=7, bytes_down=9, cut_off="client", dropped=3, mode="twisted")
    made = AccessRecord.of(
        INFO, record().request, chain, relay, replies=(ReplyCode.GRANTED,), reason=None,
        refusal=None, started=5.0, duration=2.0, time_to_grant=0.5,
    )
    assert made == record(
        ident=answer, bytes_up=7, bytes_down=9, started=5.0, duration=2.0, cut_off="client",
        dropped=3, next_hop="hop.example:1080", next_hop_reply="90", time_to_grant=0.5,
        relay="twisted",
    )


def test_a_record_without_a_chain_or_a_relay_has_nothing_counted() -> None:
    made = AccessRecord.of(
        INFO, None, None, None, replies=(), reason=None, refusal=None, started=5.0,
        duration=2.0, time_to_grant=None,
    )
    assert (made.decision, made.ident, made.address, made.next_hop, made.next_hop_reply) == (
        None, None, None, None, None)
    assert (made.reason, made.bytes_up, made.bytes_down, made.cut_off, made.dropped,
            made.relay) == ("", 0, 0, None, 0, None)
    undecided = AccessRecord.of(
        INFO, None, Chain(), None, replies=(), reason=None, refusal=None, started=5.0,
        duration=2.0, time_to_grant=None,
    )
    assert undecided.reason == ""


def test_summary_shows_the_ident_answer_and_the_next_hop() -> None:
    line = record(
        ident=IdentAnswer(IdentOutcome.USER, user_id="alice"),
        next_hop="hop.example:1080",
        next_hop_reply="90",
    ).summary()
    assert " user='alice' ident=user:'alice' CONNECT 192.0.2.7:80 via hop.example:1080 [90] -> 90 " in line


def test_fields_name_an_ident_error() -> None:
    fields = record(ident=IdentAnswer(IdentOutcome.ERROR, error="NO-USER")).fields()
    assert (fields["ident"], fields["ident_outcome"], fields["ident_error"]) == (
        "error:NO-USER", "error", "NO-USER")


def test_the_fields_of_an_event_that_carries_only_the_record() -> None:
    value = record()
    assert access_fields({"access_record": value}) == value.fields()
    assert access_fields({"access_record": "not a record"}) is None


def test_ident_summary_for_each_outcome() -> None:
    assert ident_summary(None) == "-"
    assert ident_summary(IdentAnswer(IdentOutcome.USER, user_id="x")) == "user:'x'"
    assert ident_summary(IdentAnswer(IdentOutcome.ERROR, error="NO-USER")) == "error:NO-USER"
    assert ident_summary(IdentAnswer(IdentOutcome.NO_ANSWER, error="refused")) == "no-answer"


def test_emit_publishes_summary_fields_and_the_record(access_events: list[Any]) -> None:
    value = record()
    before = time.time()
    emit(value)
    [event] = access_events
    assert event["log_format"].format(**event) == value.summary()
    assert event["access_record"] is value
    assert all(event[key] == item for key, item in value.fields().items())
    # The keys Logger.emit would have given it, for every observer that reads them.
    assert event["log_level"] is LogLevel.info
    assert event["log_namespace"] == ACCESS_NAMESPACE
    assert event["log_logger"].namespace == ACCESS_NAMESPACE
    assert "log_source" in event and event["log_source"] is None
    assert before <= event["log_time"] <= time.time()
    assert set(event) == {*FIELDS, "summary", "access_record", "log_logger", "log_level",
                          "log_namespace", "log_source", "log_format", "log_time"}


def test_an_emitted_event_reads_as_text_like_any_logged_one(access_events: list[Any]) -> None:
    value = record()
    emit(value)
    [event] = access_events
    assert formatEventAsClassicLogText(event, formatTime=lambda when: "T") == (
        f"T [socksident.access#info] {value.summary()}\n"
    )


def test_connection_info_reads_both_ends_of_a_transport() -> None:
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 1080),
        peerAddress=IPv4Address("TCP", "127.0.0.9", 5555),
    )
    info = ConnectionInfo.of_transport(transport)
    assert info == ConnectionInfo("127.0.0.9", 5555, "127.0.0.1", 1080, "127.0.0.1", 1080)
    assert (info.client, info.listener) == ("127.0.0.9:5555", "127.0.0.1:1080")




def test_behind_a_balancer_the_header_names_the_client_and_the_listener() -> None:
    from socksident.proxy import ProxyCommand, ProxyHeader

    socket_view = ConnectionInfo("10.0.0.9", 51000, "10.0.0.1", 1081, "10.0.0.1", 1081)
    header = ProxyHeader(
        2, ProxyCommand.PROXY, "TCP4", ("198.51.100.7", 40000), ("203.0.113.1", 1080)
    )
    assert socket_view.behind(header) == ConnectionInfo(
        "198.51.100.7", 40000, "203.0.113.1", 1080, "10.0.0.1", 1081, via=("10.0.0.9", 51000)
    )
