"""Every limit the server enforces, each default written once.

`twistd socks4` derives its option defaults from `ServerSettings()`, and an
embedding application passes its own instance to the factory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from socksident.identclient import DEFAULT_TIMEOUT, IDENT_PORT
from socksident.socks4 import MAX_HOSTNAME_LENGTH, MAX_USER_ID_LENGTH

__all__ = ["LISTEN_BACKLOG", "ServerSettings"]

# Connections the kernel holds for a listener before accept(); Twisted's 50
# drops a burst of clients (their SYNs wait a second for a retry).
LISTEN_BACKLOG = 1024


@dataclass(frozen=True)
class ServerSettings:
    """The server's limits, with the defaults documented in the README."""

    request_timeout: float = 30.0  # time to send a complete request
    connect_timeout: float = 120.0  # the protocol's 2 minutes to establish a connection
    bind_timeout: float = 120.0  # time for BIND's inbound connection to arrive
    idle_timeout: Optional[float] = None  # close a relay silent this long; None: never
    linger_timeout: float = 5.0  # once one side is gone, the other's time to take its bytes
    paused_check_interval: float = 1.0  # how often a paused relay side is asked if it was reset
    ident_timeout: float = DEFAULT_TIMEOUT  # connect + answer, as the CSTC server
    ident_port: int = IDENT_PORT
    bind_without_connect: bool = False
    bind_ports: Optional[tuple[int, int]] = None  # None: any free port
    bind_address: Optional[str] = None  # None: the address the client connected to
    max_user_id_length: int = MAX_USER_ID_LENGTH
    max_hostname_length: int = MAX_HOSTNAME_LENGTH
    early_data_limit: int = 64 * 1024  # buffered client bytes before its reply
    workers: int = 1  # server processes (`--workers`); 1: this process serves
    access_log: Optional[str] = None  # a JSON-lines file for access records; "-": stdout
    source_addresses: tuple[str, ...] = ()  # CONNECTs leave from these (one per family)
    connect_attempt_delay: float = 0.3  # RFC 8305: start the next address this much later
    metrics: Optional[str] = None  # endpoint serving Prometheus metrics
    max_connections: int = 0  # admitted client connections at once (per process); 0: no limit
    shutdown_timeout: float = 30.0  # on SIGTERM, time open connections have to finish
    max_per_host: int = 0  # admitted connections from one client IP at once; 0: no limit
    relay: str = "splice"  # "splice": zero-copy between plain TCP sockets on Linux; "twisted"
