"""`twistd socks4`: command-line options in, a running service out."""

from __future__ import annotations

import ipaddress
import math
import signal
import socket
from typing import Any, Callable, Optional, Sequence, cast

from twisted.application import internet, service
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import Logger
from twisted.python import usage

from socksident._types import global_reactor
from socksident.policy import DefaultPolicy, IdentMode, IPolicy
from socksident.server import SOCKS4ServerFactory
from socksident.settings import ServerSettings
from socksident.workers import WorkerPool, check_endpoints, parse_workers

__all__ = ["DEFAULT_PORT", "ListenError", "Options", "endpoint_description", "makeService"]

log = Logger()
_DEFAULTS = ServerSettings()

DEFAULT_PORT = "tcp:1080:interface=127.0.0.1"
_IDENT_MODES = {"require": IdentMode.REQUIRE, "check": IdentMode.CHECK, "off": IdentMode.OFF}


def endpoint_description(value: str) -> str:
    """A bare port number means plain TCP on every interface."""
    return f"tcp:{value}" if value.isdigit() else value


def _seconds(name: str, value: str, allow_zero: bool = False) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise usage.UsageError(f"--{name} takes a number of seconds, not {value!r}")
    if seconds < 0 or (seconds == 0 and not allow_zero):
        raise usage.UsageError(f"--{name} must be a positive number of seconds, not {value!r}")
    return seconds


def _endpoint(description: str) -> Any:
    """Parse a `--port` now, so that a typo is a usage error, not a traceback.

    twistd has installed its reactor (`--reactor`) before it parses our
    options, so importing it here picks that one.
    """
    try:
        return serverFromString(global_reactor(), description)
    except (ValueError, TypeError, KeyError, OSError) as error:
        raise usage.UsageError(f"--port {description!r}: {error}")


def _local_address(name: str, value: Optional[str]) -> Optional[str]:
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


def _port_range(value: str) -> tuple[int, int]:
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


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "A SOCKS4 and SOCKS4A proxy (CONNECT and BIND) with RFC 1413 IDENT "
        "verification. Without --rules, clients on loopback may go anywhere, "
        "clients on private networks anywhere but this host's loopback, and "
        "everyone else is refused (reply 91)."
    )
    optFlags = [
        ["bind-without-connect", None,
         "Grant BIND even when the client has no CONNECT open to DSTIP."],
    ]
    optParameters = [
        ["rules", "r", None,
         "A sockd.conf rules file (classic CSTC syntax); SIGHUP re-reads it."],
        ["request-timeout", None, f"{_DEFAULTS.request_timeout:g}",
         "Seconds a client has to send its complete request."],
        ["connect-timeout", None, f"{_DEFAULTS.connect_timeout:g}",
         "Seconds to establish the connection to the destination."],
        ["bind-timeout", None, f"{_DEFAULTS.bind_timeout:g}",
         "Seconds BIND waits for the application server's connection."],
        ["idle-timeout", None, f"{_DEFAULTS.idle_timeout or 0:g}",
         "Close a relayed connection idle this many seconds (0: never)."],
        ["ident-timeout", None, f"{_DEFAULTS.ident_timeout:g}",
         "Seconds for the ident query, connect and answer together."],
        ["ident-port", None, str(_DEFAULTS.ident_port), "Port of the identd on client hosts."],
        ["bind-ports", None, None,
         "LOW-HIGH: BIND listens only on ports in this range."],
        ["bind-address", None, None,
         "BIND listens on this IP address instead of the one the client connected to "
         "(a proxy whose application servers are on another interface)."],
        ["workers", None, str(_DEFAULTS.workers),
         "Serve with this many processes (auto: one per CPU); each client host "
         "always reaches the same one.  tcp: and tcp6: ports only."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["ports"] = []
        self["ident"] = IdentMode.OFF

    def opt_port(self, value: str) -> None:
        """Listen on this endpoint: a port number (all interfaces) or an endpoint description such as tcp:1080:interface=0.0.0.0, tcp6:1080 or ssl:...; repeatable. Default: tcp:1080:interface=127.0.0.1."""  # noqa: E501
        self["ports"].append(endpoint_description(value))

    opt_p = opt_port

    def opt_ident(self, value: str) -> None:
        """Verify users with the client's identd: require (also --ident alone: no answer -> 92, mismatch -> 93) or check (no answer lets the request through, mismatch -> 93). Default: no ident queries."""  # noqa: E501
        try:
            self["ident"] = _IDENT_MODES[value]
        except KeyError:
            raise usage.UsageError(
                f"--ident takes require, check or off, not {value!r}"
            )

    def parseOptions(self, options: Optional[Sequence[str]] = None) -> None:
        if options is None:
            import sys

            options = sys.argv[1:]
        self["argv"] = list(options)  # what --workers passes on to each worker
        super().parseOptions(_expand_bare_ident(list(options)))

    def postOptions(self) -> None:
        if not self["ports"]:
            self["ports"] = [DEFAULT_PORT]
        self["endpoints"] = [_endpoint(description) for description in self["ports"]]
        self["workers"] = parse_workers(self["workers"])
        check_endpoints(self["workers"], self["ports"], self["endpoints"])
        idle = _seconds("idle-timeout", self["idle-timeout"], allow_zero=True)
        try:
            ident_port = int(self["ident-port"])
        except ValueError:
            ident_port = 0
        if not 1 <= ident_port <= 65535:
            raise usage.UsageError(f"--ident-port takes a port number, not {self['ident-port']!r}")
        self["settings"] = ServerSettings(
            request_timeout=_seconds("request-timeout", self["request-timeout"]),
            connect_timeout=_seconds("connect-timeout", self["connect-timeout"]),
            bind_timeout=_seconds("bind-timeout", self["bind-timeout"]),
            idle_timeout=idle or None,
            ident_timeout=_seconds("ident-timeout", self["ident-timeout"]),
            ident_port=ident_port,
            bind_without_connect=bool(self["bind-without-connect"]),
            bind_ports=_port_range(self["bind-ports"]) if self["bind-ports"] else None,
            bind_address=_local_address("bind-address", self["bind-address"]),
        )
        self["policy"] = self._policy()

    def _policy(self) -> IPolicy:
        if self["rules"] is None:
            return DefaultPolicy(self["ident"])
        from socksident.commands import MAX_RUNNING, CommandRunner
        from socksident.rules import RulesError, RulesPolicy

        # The cap holds for the server as a whole: each worker has its share.
        runner = CommandRunner(max_running=max(1, MAX_RUNNING // self["workers"]))
        try:
            return RulesPolicy(self["rules"], self["ident"], run_command=runner)
        except RulesError as error:
            raise usage.UsageError(str(error))


def _expand_bare_ident(argv: list[str]) -> list[str]:
    """Let `--ident` stand alone (strict mode), as `--ident=MODE` or `--ident MODE`."""
    expanded: list[str] = []
    index = 0
    while index < len(argv):
        argument = argv[index]
        if argument == "--":
            return expanded + argv[index:]
        if argument == "--ident":
            following = argv[index + 1] if index + 1 < len(argv) else None
            if following is not None and not following.startswith("-"):
                # socks4 takes no positional arguments: this is a mode.
                expanded.append(f"--ident={following}")
                index += 2
                continue
            argument = "--ident=require"
        expanded.append(argument)
        index += 1
    return expanded


class _ReloadOnHangup(service.Service):
    """SIGHUP re-reads the rules; connections in progress keep their decision."""

    def __init__(self, policy: Any) -> None:
        self.policy = policy
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        reactor = cast(IReactorFromThreads, global_reactor())

        def hangup(signum: int, frame: Any) -> None:
            reactor.callFromThread(self.policy.reload)

        self._previous = signal.signal(signal.SIGHUP, hangup)

    def stopService(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
        super().stopService()


class _Announce(service.Service):
    def __init__(self, ports: list[str]) -> None:
        self.ports = ports

    def startService(self) -> None:
        super().startService()
        log.info("socksident SOCKS4/4A server listening on {ports}", ports=", ".join(self.ports))


class ListenError(Exception):
    """A `--port` that cannot listen; the message leads with the port, since
    a daemonizing twistd passes on only its first 100 bytes."""


class _Listener(internet.StreamServerEndpointService):
    """A `--port` that stops start-up, naming itself, when it cannot listen.

    Twisted's default is to log the failure and run on, serving nothing.  An
    ordinary exception (not SystemExit) lets a daemonizing twistd report it
    to the waiting parent and remove its pid file.
    """

    def __init__(self, description: str, endpoint: Any, factory: SOCKS4ServerFactory) -> None:
        super().__init__(endpoint, factory)
        self.description = description
        self._raiseSynchronously = True  # as twisted.application.strports does

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as error:
            raise ListenError(f"--port {self.description}: {error.socketError}") from None


#: Builds the service that serves one --port: (description, endpoint, factory).
ListenerMaker = Callable[[str, Any, SOCKS4ServerFactory], service.IService]


def makeService(options: Options, listener: Optional[ListenerMaker] = None) -> service.MultiService:
    """The server; with --workers N > 1, the parent that runs N of them.

    A worker passes its `listener`, which adopts the parent's sockets.
    """
    top = service.MultiService()
    if options["workers"] > 1 and listener is None:
        WorkerPool(
            options["workers"],
            options["argv"],
            options["ports"],
            options["endpoints"],
            reload_on_hangup=hasattr(options["policy"], "reload"),
        ).setServiceParent(top)
        return top
    factory = SOCKS4ServerFactory(options["policy"], options["settings"])
    make_listener: ListenerMaker = listener if listener is not None else _Listener
    for description, endpoint in zip(options["ports"], options["endpoints"]):
        make_listener(description, endpoint, factory).setServiceParent(top)
    if hasattr(options["policy"], "reload"):
        _ReloadOnHangup(options["policy"]).setServiceParent(top)
    _Announce(options["ports"]).setServiceParent(top)
    return top
