"""The life of one client connection as an explicit state table.

Every move `SOCKS4Server` makes goes through `enter`, which refuses a move
the table does not list: a connection can never, say, relay after it has
closed, or send a BIND's second reply before its first.
"""

from __future__ import annotations

import enum
from typing import Mapping

__all__ = ["TRANSITIONS", "InvalidTransition", "State", "enter"]


class State(str, enum.Enum):
    """Where one client connection is in its life."""

    HEADER = "header"  # a PROXY listener: reading the balancer's PROXY header
    REQUEST = "request"  # reading the request
    PENDING = "pending"  # resolving, deciding, connecting or opening BIND's listener
    BIND_WAIT = "bind-wait"  # BIND's first reply sent, waiting for the inbound connection
    RELAY = "relay"  # granted: bytes flow both ways
    CLOSED = "closed"  # ended; the access record is written or about to be


#: The only moves a connection makes; `SOCKS4Server._enter` enforces them.
TRANSITIONS: Mapping[State, frozenset[State]] = {
    State.HEADER: frozenset({State.REQUEST, State.CLOSED}),
    State.REQUEST: frozenset({State.PENDING, State.CLOSED}),
    State.PENDING: frozenset({State.BIND_WAIT, State.RELAY, State.CLOSED}),
    State.BIND_WAIT: frozenset({State.RELAY, State.CLOSED}),
    State.RELAY: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}


class InvalidTransition(RuntimeError):
    """A move `TRANSITIONS` does not allow: a bug in the server."""


def enter(current: State, new: State) -> State:
    """`new`, if the table allows moving there from `current`."""
    if new not in TRANSITIONS[current]:
        raise InvalidTransition(f"{current.name} -> {new.name}")
    return new
