"""Fuzz target: the RFC 1413 answer reader (`socksident.ident`).

Any bytes in any split end in None, an `IdentAnswer` or `MalformedResponse`,
the same whatever the split, and the reader never holds more than one line.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["socksident"]):
    from socksident.ident import MAX_RESPONSE_LINE, MalformedResponse, ResponseReader

from _split import pieces

__all__ = ["TestOneInput"]


def _read(parts: list[bytes], client_port: int, server_port: int, close: bool) -> object:
    reader = ResponseReader(client_port, server_port)
    try:
        answer = None
        for part in parts:
            answer = reader.feed(part)
            # a hostile identd cannot make the reader buffer without end
            assert len(reader._buffer) <= MAX_RESPONSE_LINE + len(part) + 2
            if answer is not None:
                break
        if close:
            reader.connection_closed()
        return ("answer", answer)
    except MalformedResponse:
        return ("malformed",)


def TestOneInput(data: bytes) -> None:
    control, parts = pieces(data)
    # the ports the reader expects: often the pair a line names, sometimes any
    client_port, server_port = (6193, 23) if control & 1 else (control * 257 % 65536, 1080)
    close = bool(control & 2)
    split = _read(parts, client_port, server_port, close)
    whole = _read([b"".join(parts)], client_port, server_port, close)
    assert split == whole, (split, whole)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
