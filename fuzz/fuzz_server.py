"""Fuzz target: the server protocol fed through `StringTransport`.

No exception escapes `dataReceived`; the only bytes written before a
connection exists are one of the answers a client can get; no timer
outlives the connection; at most one access record and no logged failure.
"""

from __future__ import annotations

import sys
from typing import Any

import atheris

with atheris.instrument_imports(include=["socksident"]):
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import MemoryReactorClock, StringTransport
    from twisted.logger import globalLogPublisher
    from twisted.python.failure import Failure

    from socksident.server import ServerSettings, SOCKS4ServerFactory
    from socksident.socks4 import (
        HTTP_NOT_A_WEB_PROXY,
        SOCKS5_NO_ACCEPTABLE_METHODS,
        parse_reply,
    )

from _split import pieces

__all__ = ["TestOneInput"]


class _Transport(StringTransport):
    write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True


class _Resolver:
    """Never answers: a SOCKS4A request stays pending until the client leaves."""

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0, **kw: Any) -> None:
        receiver.resolutionBegan(None)


def _no_ident(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the default policy asks no identd")


_EVENTS: list[dict[str, Any]] = []
globalLogPublisher.addObserver(_EVENTS.append)


def TestOneInput(data: bytes) -> None:
    control, parts = pieces(data)
    reactor = MemoryReactorClock()
    factory = SOCKS4ServerFactory(
        settings=ServerSettings(early_data_limit=(64 * 1024, 16, 1, 200)[control % 4]),
        reactor=reactor,
        resolver=_Resolver(),
        ident_query=_no_ident,
    )
    client = IPv4Address("TCP", "127.0.0.1", 40000)
    proto = factory.buildProtocol(client)
    transport = _Transport(hostAddress=IPv4Address("TCP", "127.0.0.1", 1080), peerAddress=client)
    del _EVENTS[:]
    proto.makeConnection(transport)
    for part in parts:
        proto.dataReceived(part)  # must not raise
        if control & 8:
            reactor.advance(1)
    written = transport.value()
    if control & 4:
        proto.readConnectionLost()
    if control & 16:
        reactor.advance(31)  # past the request timeout
    proto.connectionLost(Failure(Exception("client gone")))

    assert written in (b"", SOCKS5_NO_ACCEPTABLE_METHODS, HTTP_NOT_A_WEB_PROXY) or (
        len(written) == 8 and parse_reply(written)[0] in (91, 92, 93)
    ), written
    assert reactor.getDelayedCalls() == [], reactor.getDelayedCalls()
    access = [e for e in _EVENTS if e.get("log_namespace") == "socksident.access"]
    assert len(access) == 1, access
    failures = [e for e in _EVENTS if "log_failure" in e]
    assert failures == [], [e["log_failure"].getTraceback() for e in failures]


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
