"""One access record per request: built once, as a value, when it ends.

`AccessRecord` holds what happened to one client connection (who, what it
asked, the decision, the ident answer, every reply sent, where it went,
bytes, time).  Its `summary` is the text line operators read; its `fields`
are the one schema every machine reader uses (the structured log event,
the JSON access log, metrics).  `emit` publishes it on the
``socksident.access`` logger namespace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional, Protocol

from twisted.logger import Logger, LogLevel

from socksident.connection import ConnectionInfo
from socksident.ident import IdentAnswer, IdentOutcome
from socksident.policy import Decision
from socksident.socks4 import Command, ReplyCode, Request, SOCKS4Refusal

__all__ = [
    "ACCESS_NAMESPACE",
    "FIELDS",
    "AccessRecord",
    "ChainOutcome",
    "RelayCounts",
    "access_event",
    "access_fields",
    "emit",
    "ident_summary",
]

ACCESS_NAMESPACE = "socksident.access"
_access_log = Logger(namespace=ACCESS_NAMESPACE)


def ident_summary(answer: Optional[IdentAnswer]) -> str:
    """The ident result as the text line shows it.

    ``-`` (nobody was asked), ``user:'name'``, ``error:TYPE`` or ``no-answer``.
    """
    if answer is None:
        return "-"
    if answer.user_id is not None:
        return f"user:{answer.user_id!r}"
    if answer.outcome is IdentOutcome.ERROR:
        return f"error:{answer.error}"
    return "no-answer"


class ChainOutcome(Protocol):
    """What a record reads from a request's chain (`establish.Establishment`)."""

    @property
    def decision(self) -> Optional[Decision]: ...

    @property
    def ident_answer(self) -> Optional[IdentAnswer]: ...

    @property
    def destination_address(self) -> Optional[str]: ...

    @property
    def next_hop_name(self) -> Optional[str]: ...

    @property
    def hop_reply(self) -> Optional[str]: ...


class RelayCounts(Protocol):
    """What a record reads from a finished relay (`relay.Relay`)."""

    @property
    def bytes_up(self) -> int: ...

    @property
    def bytes_down(self) -> int: ...

    @property
    def cut_off(self) -> Optional[str]: ...

    @property
    def dropped(self) -> int: ...

    @property
    def mode(self) -> str: ...


@dataclass(frozen=True, slots=True)
class AccessRecord:
    """What one client connection did, from accept to both sides closed.

    ``replies`` are the reply codes in the order they were sent (a granted
    BIND has two); ``address`` is the IP connected to (BIND: the
    application server's); ``started`` is in the reactor's seconds.
    ``cut_off`` names the relay side ("client", "remote" or "both") that
    was aborted because it did not take its bytes within the linger time
    after its peer was gone, and ``dropped`` counts the bytes it had not
    taken; None and 0 when every side closed on its own.  ``next_hop`` is
    the proxy the request was forwarded to (None: connected directly).
    """

    connection: ConnectionInfo
    request: Optional[Request]
    decision: Optional[Decision]
    ident: Optional[IdentAnswer]
    replies: tuple[ReplyCode, ...]
    reason: str
    refusal: Optional[SOCKS4Refusal]
    address: Optional[str]
    bytes_up: int
    bytes_down: int
    started: float
    duration: float
    cut_off: Optional[str] = None
    dropped: int = 0
    next_hop: Optional[str] = None  # the next hop the request went to, if any
    next_hop_reply: Optional[str] = None  # what it answered: "90", "91", "unreachable: ..."
    time_to_grant: Optional[float] = None  # seconds from accept to the (last) reply 90
    relay: Optional[str] = None  # "splice" or "twisted": how the bytes moved; None: no relay

    @classmethod
    def of(
        cls,
        connection: ConnectionInfo,
        request: Optional[Request],
        chain: Optional[ChainOutcome],
        relay: Optional[RelayCounts],
        *,
        replies: tuple[ReplyCode, ...],
        reason: Optional[str],
        refusal: Optional[SOCKS4Refusal],
        started: float,
        duration: float,
        time_to_grant: Optional[float],
    ) -> "AccessRecord":
        """The record of a connection whose chain and relay (if it got that
        far) are done; `reason` None: the decision's."""
        decision = chain.decision if chain is not None else None
        if reason is None:
            reason = decision.reason if decision is not None else ""
        return cls(
            connection=connection,
            request=request,
            decision=decision,
            ident=chain.ident_answer if chain is not None else None,
            replies=replies,
            reason=reason,
            refusal=refusal,
            address=chain.destination_address if chain is not None else None,
            bytes_up=relay.bytes_up if relay is not None else 0,
            bytes_down=relay.bytes_down if relay is not None else 0,
            started=started,
            duration=duration,
            cut_off=relay.cut_off if relay is not None else None,
            dropped=relay.dropped if relay is not None else 0,
            next_hop=chain.next_hop_name if chain is not None else None,
            next_hop_reply=chain.hop_reply if chain is not None else None,
            time_to_grant=time_to_grant,
            relay=relay.mode if relay is not None else None,
        )

    @property
    def code(self) -> Optional[ReplyCode]:
        """The reply that settled the request; None when none did.

        A BIND that got only its first 90 (its client left, or the server
        stopped, before the second reply) was never settled.
        """
        if not self.replies:
            return None
        request = self.request
        if (
            request is not None
            and request.command is Command.BIND
            and self.replies == (ReplyCode.GRANTED,)
        ):
            return None
        return self.replies[-1]

    @property
    def rule(self) -> Optional[str]:
        return self.decision.rule if self.decision is not None else None

    def summary(self) -> str:
        """The access line, e.g. ``127.0.0.1:5 user='u' ident=- CONNECT h:80 -> 90 (...)``."""
        request = self.request
        if request is None:
            asked = " (no valid request)"
        else:
            via = f" [{self.address}]" if request.hostname and self.address else ""
            asked = (
                f" user={request.user_id!r} ident={ident_summary(self.ident)}"
                f" {request.command.name} {request.destination}:{request.port}{via}"
            )
        code = self.code
        cut = (
            f" cut-off={self.cut_off} dropped={self.dropped}" if self.cut_off is not None else ""
        )
        hop = f" via {self.next_hop} [{self.next_hop_reply}]" if self.next_hop else ""
        return (
            f"{self.connection.client}{asked}{hop} -> {int(code) if code is not None else '-'}"
            f" ({self.reason}) up={self.bytes_up} down={self.bytes_down}"
            f" in {self.duration:.3f}s{cut}"
        )

    def fields(self) -> dict[str, Any]:
        """Every field by name, JSON-ready: the schema the README documents."""
        request = self.request
        answer = self.ident
        code = self.code
        return {
            "time": self.started,
            "client": self.connection.client,
            "listener": self.connection.listener,
            "via": self.connection.via_text,
            "user": request.user_id if request else None,
            "command": request.command.name if request else None,
            "destination": request.destination if request else None,
            "port": request.port if request else None,
            "address": self.address,
            "next_hop": self.next_hop,
            "code": int(code) if code is not None else None,
            "replies": [int(reply) for reply in self.replies],
            "reason": self.reason,
            "refusal": type(self.refusal).__name__ if self.refusal is not None else None,
            "rule": self.rule,
            "ident": ident_summary(answer),
            "ident_outcome": answer.outcome.value if answer else None,
            "ident_user": answer.user_id if answer else None,
            "ident_opsys": answer.opsys if answer else None,
            "ident_error": answer.error if answer else None,
            "ident_duration": answer.duration if answer else None,
            "time_to_grant": self.time_to_grant,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "duration": self.duration,
            "cut_off": self.cut_off,
            "dropped": self.dropped,
            "next_hop_reply": self.next_hop_reply,
            "relay": self.relay,
        }


#: The names `AccessRecord.fields` returns, in its order (the README's schema).
FIELDS = (
    "time", "client", "listener", "via", "user", "command", "destination", "port",
    "address", "next_hop", "code", "replies", "reason", "refusal", "rule", "ident",
    "ident_outcome", "ident_user", "ident_opsys", "ident_error", "ident_duration",
    "time_to_grant", "bytes_up", "bytes_down", "duration", "cut_off", "dropped",
    "next_hop_reply", "relay",
)


def access_fields(event: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The access record's fields carried by `event`, or None if it has none.

    In the process that built it, the record rides along as
    ``access_record``; an event a worker sent its parent (as JSON) has only
    the fields, which `emit` put in every access event.
    """
    record = event.get("access_record")
    if isinstance(record, AccessRecord):
        return record.fields()
    if event.get("log_namespace") != ACCESS_NAMESPACE or not all(k in event for k in FIELDS):
        return None
    return {name: event[name] for name in FIELDS}


def access_event(
    fields: dict[str, Any], summary: Optional[str], when: Optional[float]
) -> dict[str, Any]:
    """An access event's keys, as `emit` publishes it and a worker's parent
    rebuilds it (None: the worker's line lacked the text or the time).

    The text is one preformatted field: every event is formatted by the
    text observer, and a format string of twenty fields costs more than the
    relay itself on short connections.  The other keys are those
    `Logger.emit` gives an event.
    """
    return {
        **fields,
        "summary": summary,
        "log_level": LogLevel.info,
        "log_namespace": ACCESS_NAMESPACE,
        "log_source": None,
        "log_format": "{summary}",
        "log_time": when,
    }


def emit(record: AccessRecord) -> None:
    """Publish `record` as one ``socksident.access`` event (`access_event`).

    The record itself rides along as ``access_record`` for observers that
    want the value.  The event is handed to the logger's observer here:
    `Logger.emit` first checks its level against every `LogLevel` and
    copies the keyword arguments, which doubled what an event cost before
    any observer saw it (10 us against 5 on the development machine), for a
    level that is a constant.
    """
    event = access_event(record.fields(), record.summary(), time.time())
    event["access_record"] = record
    event["log_logger"] = _access_log
    _access_log.observer(event)
