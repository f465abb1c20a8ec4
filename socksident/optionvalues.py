"""The values `twistd socks4` options take, checked when the options are parsed.

Each check turns a bad value into a `UsageError` naming the option and what
it takes, before anything listens; endpoints are parsed here too, so a typo
in ``--port`` or ``--next-hop`` is a usage line, not a traceback at start-up.
"""

from __future__ import annotations

import ipaddress
import math
import socket
from typing import Any, Optional

from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from socksident._types import global_reactor
from socksident.jsonlog import AccessLogFile
from socksident.settings import LISTEN_BACKLOG

__all__ = [
    "PROXY_PREFIX",
    "access_log_file",
    "count",
    "endpoint_description",
    "listen_endpoint",
    "local_address",
    "metrics_endpoint",
    "next_hop",
    "port_number",
    "port_range",
    "relay_mode",
    "seconds",
    "split_proxy",
    "with_backlog",
]


def endpoint_description(value: str) -> str:
    """A bare port number means plain TCP on every interface."""
    return f"tcp:{value}" if value.isdigit() else value


def with_backlog(description: str) -> str:
    """A TCP or TLS listener that does not set `backlog=` gets LISTEN_BACKLOG."""
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6", "ssl") and "backlog=" not in description:
        return f"{description}:backlog={LISTEN_BACKLOG}"
    return description


PROXY_PREFIX = "haproxy:"


def split_proxy(description: str) -> tuple[str, bool]:
    """``haproxy:ENDPOINT`` -> (ENDPOINT, True): Twisted's spelling, our header parser.

    The server reads the PROXY header itself instead of Twisted's wrapper,
    which reports the balancer as the client until the header is parsed and
    turns a client's half-close into a full close.
    """
    if description.startswith(PROXY_PREFIX):
        return endpoint_description(description[len(PROXY_PREFIX) :]), True
    return description, False


def seconds(name: str, value: str, allow_zero: bool = False) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise usage.UsageError(f"--{name} takes a number of seconds, not {value!r}")
    if number < 0 or (number == 0 and not allow_zero):
        raise usage.UsageError(f"--{name} must be a positive number of seconds, not {value!r}")
    return number


def listen_endpoint(description: str) -> Any:
    """Parse a `--port` now, so that a typo is a usage error, not a traceback.

    twistd has installed its reactor (`--reactor`) before it parses our
    options, so importing it here picks that one.
    """
    try:
        return serverFromString(global_reactor(), description)
    except (ValueError, TypeError, KeyError, OSError) as error:
        raise usage.UsageError(f"--port {description!r}: {error}")


def next_hop(description: Optional[str]) -> Any:
    """`--next-hop`, parsed now: a typo is a usage error naming the option."""
    if description is None:
        return None
    from twisted.internet.endpoints import clientFromString

    from OpenSSL import crypto
    from twisted.internet.error import VerifyError

    from socksident.nexthop import NextHop

    try:
        endpoint = clientFromString(global_reactor(), description)
    except (ValueError, TypeError, KeyError, OSError, AttributeError, VerifyError) as error:
        raise usage.UsageError(f"--next-hop {description!r}: {error}")
    except crypto.Error as error:
        # tls:'s certificate=/privateKey= (or trustRoots=) hold no PEM it can read.
        raise usage.UsageError(
            f"--next-hop {description!r}: cannot read a certificate or key ({error})"
        )
    return NextHop(endpoint, description)


def local_address(name: str, value: Optional[str]) -> Optional[str]:
    """An IP address of this host: every BIND would fail on any other."""
    if value is None:
        return None
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise usage.UsageError(f"--{name} takes an IP address, not {value!r}")
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError as error:
            raise usage.UsageError(
                f"--{name} {value}: not an address of this host ({error.strerror})"
            )
    return str(address)


def access_log_file(path: Optional[str]) -> Optional[AccessLogFile]:
    """Open the access log now, before twistd drops privileges."""
    if path is None:
        return None
    try:
        return AccessLogFile(path)
    except OSError as error:
        raise usage.UsageError(f"--access-log {path}: {error.strerror}")


def metrics_endpoint(description: Optional[str]) -> Any:
    if description is None:
        return None
    try:
        import socksident.metrics  # noqa: F401
    except ImportError as error:
        raise usage.UsageError(
            f"--metrics needs prometheus_client ({error}): pip install 'socksident[metrics]'"
        )
    try:
        return serverFromString(global_reactor(), endpoint_description(description))
    except (ValueError, TypeError, KeyError, OSError) as error:
        raise usage.UsageError(f"--metrics {description!r}: {error}")


def count(name: str, value: str) -> int:
    """A limit: a whole number, 0 meaning none."""
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise usage.UsageError(f"--{name} takes a whole number (0: no limit), not {value!r}")
    return number


def port_range(value: str) -> tuple[int, int]:
    low, sep, high = value.partition("-")
    try:
        numbers = (int(low), int(high if sep else low))
    except ValueError:
        numbers = (0, -1)
    if not 1 <= numbers[0] <= numbers[1] <= 65535:
        raise usage.UsageError(
            f"--bind-ports takes LOW-HIGH with 1 <= LOW <= HIGH <= 65535, not {value!r}"
        )
    return numbers


def relay_mode(value: str) -> str:
    if value not in ("splice", "twisted"):
        raise usage.UsageError(f"--relay takes splice or twisted, not {value!r}")
    return value


def port_number(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= 65535:
        raise usage.UsageError(f"--{name} takes a port number, not {value!r}")
    return number
