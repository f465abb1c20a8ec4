"""`twistd socks4`: command-line options in, a running service out."""

from __future__ import annotations

import ipaddress
import math
import socket
from typing import Any, Optional, Sequence

from twisted.application import service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from socksident._types import global_reactor
from socksident.drain import Drain
from socksident.jsonlog import AccessLogFile, ReopenOnSignal
from socksident.policy import DefaultPolicy, IdentMode, IPolicy
from socksident.server import SOCKS4ServerFactory
from socksident.services import (
    Announce,
    FreezeAfterStartUp,
    ListenError,
    Listener,
    ListenerMaker,
    ReloadOnHangup,
    StopInOrder,
)
from socksident.settings import LISTEN_BACKLOG, ServerSettings
from socksident.workers import WorkerPool, check_endpoints, parse_workers

__all__ = [
    "DEFAULT_PORT",
    "PROXY_PREFIX",
    "ListenError",
    "Options",
    "endpoint_description",
    "makeService",
    "split_proxy",
    "with_backlog",
]

log = Logger()
_DEFAULTS = ServerSettings()

DEFAULT_PORT = "tcp:1080:interface=127.0.0.1"
_IDENT_MODES = {"require": IdentMode.REQUIRE, "check": IdentMode.CHECK, "off": IdentMode.OFF}


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


def _next_hop(description: Optional[str]) -> Any:
    """`--next-hop`, parsed now: a typo is a usage error naming the option."""
    if description is None:
        return None
    from twisted.internet.endpoints import clientFromString

    from socksident.nexthop import NextHop

    from OpenSSL import crypto
    from twisted.internet.error import VerifyError

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


def _access_log(path: Optional[str]) -> Optional[AccessLogFile]:
    """Open the access log now, before twistd drops privileges."""
    if path is None:
        return None
    try:
        return AccessLogFile(path)
    except OSError as error:
        raise usage.UsageError(f"--access-log {path}: {error.strerror}")


def _metrics_endpoint(description: Optional[str]) -> Any:
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


def _count(name: str, value: str) -> int:
    """A limit: a whole number, 0 meaning none."""
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise usage.UsageError(f"--{name} takes a whole number (0: no limit), not {value!r}")
    return number


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
        ["linger-timeout", None, f"{_DEFAULTS.linger_timeout:g}",
         "Once one side of a relay is gone, seconds the other has to take what is "
         "queued for it before it is aborted."],
        ["ident-timeout", None, f"{_DEFAULTS.ident_timeout:g}",
         "Seconds for the ident query, connect and answer together."],
        ["ident-port", None, str(_DEFAULTS.ident_port), "Port of the identd on client hosts."],
        ["bind-ports", None, None,
         "LOW-HIGH: BIND listens only on ports in this range."],
        ["next-hop", None, None,
         "A client endpoint description (tcp:host=10.0.0.2:port=1080, tls:...): SOCKS4A "
         "names that do not resolve here are passed on to this SOCKS4 server."],
        ["bind-address", None, None,
         "BIND listens on this IP address instead of the one the client connected to "
         "(a proxy whose application servers are on another interface)."],
        ["workers", None, str(_DEFAULTS.workers),
         "Serve with this many processes (auto: one per CPU); each client host "
         "always reaches the same one.  tcp: and tcp6: ports only."],
        ["access-log", None, _DEFAULTS.access_log,
         "Write one JSON line per finished request to this file ('-': standard output); "
         "SIGUSR1 reopens it."],
        ["shutdown-timeout", None, f"{_DEFAULTS.shutdown_timeout:g}",
         "On SIGTERM, seconds the open connections have to finish before they are "
         "cut off (0: at once); a second SIGTERM cuts them off at once."],
        ["max-connections", None, str(_DEFAULTS.max_connections),
         "Serve at most this many client connections at once (0: no limit); past it a "
         "new client is answered 91.  With --workers, each worker's own limit."],
        ["max-per-host", None, str(_DEFAULTS.max_per_host),
         "Serve at most this many connections at once from one client IP address "
         "(0: no limit); past it that host's new connections are answered 91."],
        ["metrics", None, _DEFAULTS.metrics,
         "Serve Prometheus metrics on this endpoint, e.g. tcp:9108:interface=127.0.0.1 "
         "(needs pip install socksident[metrics])."],
    ]

    def __init__(self, worker: bool = False) -> None:
        super().__init__()
        #: One of the processes of --workers N: the parent writes the
        #: access log and serves the metrics, not this process.
        self.worker = worker
        self["ports"] = []
        self["ident"] = IdentMode.OFF
        self["source-addresses"] = list(_DEFAULTS.source_addresses)

    def opt_port(self, value: str) -> None:
        """Listen on this endpoint: a port number (all interfaces) or an endpoint description such as tcp:1080:interface=0.0.0.0, tcp6:1080 or ssl:..., or haproxy:ENDPOINT behind a load balancer sending PROXY headers (v1 or v2; needs --bind-address); repeatable. Default: tcp:1080:interface=127.0.0.1."""  # noqa: E501
        self["ports"].append(endpoint_description(value))

    opt_p = opt_port

    def opt_source_address(self, value: str) -> None:
        """CONNECTs leave from this IP address of this host; give it twice for one IPv4 and one IPv6 address. Destinations of a family without one are not tried. Default: the system picks."""  # noqa: E501
        address = _local_address("source-address", value)
        assert address is not None
        if any((":" in known) == (":" in address) for known in self["source-addresses"]):
            raise usage.UsageError(
                f"--source-address {value}: one address per family (IPv4, IPv6)"
            )
        self["source-addresses"].append(address)

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
        split = [split_proxy(description) for description in self["ports"]]
        self["endpoints"] = [_endpoint(with_backlog(port)) for port, _ in split]
        self["proxied"] = [proxied for _, proxied in split]
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
            linger_timeout=_seconds("linger-timeout", self["linger-timeout"]),
            ident_timeout=_seconds("ident-timeout", self["ident-timeout"]),
            ident_port=ident_port,
            bind_without_connect=bool(self["bind-without-connect"]),
            bind_ports=_port_range(self["bind-ports"]) if self["bind-ports"] else None,
            bind_address=_local_address("bind-address", self["bind-address"]),
            access_log=self["access-log"],
            source_addresses=tuple(self["source-addresses"]),
            metrics=self["metrics"],
            max_connections=_count("max-connections", self["max-connections"]),
            max_per_host=_count("max-per-host", self["max-per-host"]),
            shutdown_timeout=_seconds("shutdown-timeout", self["shutdown-timeout"], allow_zero=True),
        )
        self["access-log-file"] = None if self.worker else _access_log(self["access-log"])
        if any(self["proxied"]) and self["settings"].bind_address is None:
            raise usage.UsageError(
                "--port haproxy:... needs --bind-address: behind a balancer the address a"
                " client connected to is not one this host can listen on for BIND"
            )
        self["metrics-endpoint"] = _metrics_endpoint(self["metrics"])
        self["policy"] = self._policy()
        self["next_hop"] = _next_hop(self["next-hop"])
        if self["next_hop"] is None:
            _check_no_route_to_next_hop(self["policy"])

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


def _check_no_route_to_next_hop(policy: IPolicy) -> None:
    """A rules line sending requests via a next hop that is not configured is
    a start-up error (a reload that adds one refuses those requests with 91)."""
    from socksident.policy import Route
    from socksident.rules import RulesPolicy

    if not isinstance(policy, RulesPolicy):
        return
    for rule in policy.rules.rules:
        if rule.route is Route.NEXT_HOP:
            raise usage.UsageError(
                f"{rule.location}: via=next-hop, but no --next-hop is set;"
                " add --next-hop ENDPOINT or remove via=next-hop"
            )


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


def _parent_service(options: Options) -> service.MultiService:
    """--workers N: the pool, and the one access-log writer and metrics endpoint.

    Started in order (the metrics directory exists before a worker starts),
    stopped in reverse, each after the one before it has finished.
    """
    top = StopInOrder()
    pool = WorkerPool(
        options["workers"],
        options["argv"],
        options["ports"],
        options["endpoints"],
        reload_on_hangup=hasattr(options["policy"], "reload"),
        # The workers' drain, and time to write their records and exit.
        stop_timeout=options["settings"].shutdown_timeout + 30,
    )
    if options.get("metrics-endpoint") is not None:
        from socksident.metrics import AggregatedMetricsService

        metrics = AggregatedMetricsService(options["metrics-endpoint"], pool.environ)
        pool.exited.append(metrics.worker_exited)
        metrics.setServiceParent(top)
    if options.get("access-log-file") is not None:
        ReopenOnSignal(options["access-log-file"]).setServiceParent(top)
    pool.setServiceParent(top)
    return top


def makeService(options: Options, listener: Optional[ListenerMaker] = None) -> service.MultiService:
    """The server; with --workers N > 1, the parent that runs N of them.

    A worker passes its `listener`, which adopts the parent's sockets.
    """
    if options["workers"] > 1 and listener is None:
        return _parent_service(options)
    top = service.MultiService()
    factory = SOCKS4ServerFactory(
        options["policy"], options["settings"], next_hop=options.get("next_hop")
    )
    make_listener: ListenerMaker = listener if listener is not None else Listener
    for description, endpoint, proxied in zip(
        options["ports"], options["endpoints"], options["proxied"]
    ):
        listening = factory.proxy_listener() if proxied else factory
        make_listener(description, endpoint, listening).setServiceParent(top)
    Drain(factory, options["settings"].shutdown_timeout).setServiceParent(top)
    if options.get("metrics-endpoint") is not None:
        from socksident.metrics import Metrics, MetricsService

        # A worker counts into the files its parent sums and serves.
        endpoint = None if getattr(options, "worker", False) else options["metrics-endpoint"]
        MetricsService(Metrics(), endpoint, factory.live).setServiceParent(top)
    if options.get("access-log-file") is not None:
        ReopenOnSignal(options["access-log-file"]).setServiceParent(top)
    if hasattr(options["policy"], "reload"):
        ReloadOnHangup(options["policy"]).setServiceParent(top)
    Announce(options["ports"]).setServiceParent(top)
    FreezeAfterStartUp().setServiceParent(top)
    return top
