"""One reading of an address string for every module.

A dual-stack listener reports IPv4 peers as ``::ffff:a.b.c.d`` and IPv6 link
addresses may carry a ``%scope``; policies, rules, the ident client and the
access log must all see the same plain address, or a rule written for
10.0.0.0/8 would miss a client it was meant for.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from typing import Any, Optional, Union

__all__ = [
    "IPAddress",
    "host_and_port",
    "ip_of",
    "is_unspecified",
    "not_local_because",
    "plain_host",
]

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


@functools.lru_cache(maxsize=4096)
def ip_of(host: str) -> Optional[IPAddress]:
    """The IP address `host` names, IPv4-mapped IPv6 as IPv4; None if not an IP."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def is_unspecified(host: str) -> bool:
    """0.0.0.0 or :: (a connect to either reaches this host itself)."""
    address = ip_of(host)
    return address is not None and address.is_unspecified


def host_and_port(address: Any) -> tuple[str, int]:
    """Host and port of a Twisted IPv4Address/IPv6Address (a UNIX peer has neither)."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    return (plain_host(host) if isinstance(host, str) else "?", port if isinstance(port, int) else 0)


@functools.lru_cache(maxsize=4096)
def plain_host(host: str) -> str:
    """`host` with an IPv4-mapped address spelled as IPv4; other text unchanged."""
    address = ip_of(host)
    if isinstance(address, ipaddress.IPv4Address):
        return str(address)
    return host


def not_local_because(host: str) -> Optional[str]:
    """Why this host cannot send from `host` (bind to it), or None when it can.

    Behind a balancer the address a client connected to may be the
    balancer's alone; a socket bound there is the only test that holds.
    """
    address = ip_of(host)
    if address is None:
        return f"{host!r} is not an IP address"
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host if "%" in host else str(address), 0))
        except OSError as error:
            return error.strerror or str(error)
    return None
