"""The parts of a reactor socksident calls, as structural types.

Twisted's reactor interfaces are separate zope interfaces and mypy cannot
name "IReactorTCP and IReactorTime at once"; these Protocols say exactly
what each piece of code uses, so a `MemoryReactorClock` and the real
reactor both fit.  `global_reactor` is the one place that imports the
global reactor, at call time (twistd installs its `--reactor` first).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, cast

from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ClientFactory, ProcessProtocol, ServerFactory

__all__ = [
    "DelayedCall",
    "ReactorTime",
    "ReactorTCPTime",
    "ReactorProcessTime",
    "global_reactor",
]


class DelayedCall(Protocol):
    """What `callLater` returns, as far as we use it."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...

    def reset(self, secondsFromNow: float) -> None: ...


class ReactorTime(Protocol):
    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> Any: ...

    def seconds(self) -> float: ...


class ReactorTCPTime(ReactorTime, Protocol):
    """IReactorTCP and IReactorTime: the server, the ident client, BIND."""

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: ClientFactory,
        timeout: Optional[float] = ...,
        bindAddress: Optional[tuple[str, int]] = ...,
    ) -> Any: ...

    def listenTCP(
        self, port: int, factory: ServerFactory, backlog: int = ..., interface: str = ...
    ) -> IListeningPort: ...


class ReactorProcessTime(Protocol):
    """IReactorProcess and IReactorTime: the rule-command runner."""

    def spawnProcess(
        self,
        processProtocol: ProcessProtocol,
        executable: str,
        args: Sequence[str],
        env: Optional[Mapping[str, str]] = ...,
    ) -> Any: ...

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any
    ) -> Any: ...


def global_reactor() -> Any:
    """The reactor twistd (or the application) installed, looked up now."""
    from twisted.internet import reactor

    return cast(Any, reactor)
