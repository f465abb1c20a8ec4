"""Fuzz target: the SOCKS4/4A request parser (`socksident.socks4`).

Any bytes in any split end in None, a `Request` or a `ProtocolError`, the same
whatever the split; a parsed request rebuilt parses to itself.
"""

from __future__ import annotations

import dataclasses
import sys

import atheris

with atheris.instrument_imports(include=["socksident"]):
    from socksident.socks4 import (
        ProtocolError,
        RequestParser,
        build_request,
    )

from _split import pieces

__all__ = ["TestOneInput"]


def _feed(parts: list[bytes], user_limit: int, host_limit: int) -> tuple[str, object]:
    parser = RequestParser(user_limit, host_limit)
    try:
        for part in parts:
            request = parser.feed(part)
            if request is not None:
                return "request", (request, parser.leftover)
        return "incomplete", None
    except ProtocolError as error:
        return "error", type(error)


def TestOneInput(data: bytes) -> None:
    control, parts = pieces(data)
    user_limit, host_limit = (255, 255) if control < 128 else (control % 40, control % 50 + 1)
    outcome = _feed(parts, user_limit, host_limit)
    whole = _feed([b"".join(parts)], user_limit, host_limit)
    if outcome[0] == "request" and whole[0] == "request":
        # leftover may differ by where the request ended in a piece: compare requests
        assert outcome[1][0] == whole[1][0], (outcome, whole)  # type: ignore[index]
    else:
        assert outcome == whole, (outcome, whole)
    if outcome[0] == "request":
        request = outcome[1][0]  # type: ignore[index]
        wire = build_request(
            request.command, request.port, request.address, request.user_id, request.hostname
        )
        rebuilt = RequestParser(user_limit, host_limit).feed(wire)
        if request.hostname is not None:  # the builder writes the 0.0.0.1 marker
            request = dataclasses.replace(request, address="0.0.0.1")
        assert rebuilt == request, (wire, rebuilt, request)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
