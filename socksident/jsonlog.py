"""Logs as JSON lines: the access log file, and every event for `twistd --logger`.

`AccessLogFile` writes one JSON object per `AccessRecord` (its `fields()`,
the one schema) as a single ``write(2)`` of a whole line, so a reader, a
crash or a rotation never sees half a line.  `ReopenOnSignal` reopens it on
SIGUSR1 (what ``logrotate`` sends after renaming the file) and passes the
signal on to the handler installed before it, so twistd's own ``--logfile``
still rotates.  `observer` is the factory ``twistd --logger
socksident.jsonlog.observer`` calls: every event, one JSON object a line.
"""

from __future__ import annotations

import json
import os
import signal
from typing import IO, Any, Callable, Optional, cast

from twisted.application import service
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    LogEvent,
    eventAsJSON,
    globalLogPublisher,
)
from zope.interface import implementer

from socksident._types import global_reactor
from socksident.accesslog import AccessRecord, access_fields

__all__ = ["JSON_LOG_ENV", "AccessLogFile", "ReopenOnSignal", "observer"]

#: The file `observer` writes to; unset or ``-``: standard output.
JSON_LOG_ENV = "SOCKSIDENT_JSON_LOG"


@implementer(ILogObserver)
class AccessLogFile:
    """An observer writing each access record as one JSON line to `path`.

    ``-`` is standard output (file descriptor 1, which twistd leaves alone
    when it captures ``sys.stdout``).  A file is opened for appending;
    `reopen` closes it and opens the same path again.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = -1
        self.open()

    def open(self) -> None:
        if self.path == "-":
            self._fd = 1
        else:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def reopen(self) -> None:
        """Start writing to whatever now has our path (after a rename)."""
        old = self._fd
        self.open()
        if old > 2:
            os.close(old)

    def close(self) -> None:
        if self._fd > 2:
            os.close(self._fd)
        self._fd = -1

    def write(self, record: AccessRecord) -> None:
        self.write_fields(record.fields())

    def write_fields(self, fields: dict[str, Any]) -> None:
        line = (json.dumps(fields, ensure_ascii=False) + "\n").encode()
        view = memoryview(line)
        while view:  # one write(2) for a regular file; a pipe may take less
            view = view[os.write(self._fd, view):]

    def __call__(self, event: LogEvent) -> None:
        # Under --workers this is the parent: the records arrive as a
        # worker's events, fields without the record value.
        fields = access_fields(event)
        if fields is not None and self._fd >= 0:
            self.write_fields(fields)


class ReopenOnSignal(service.Service):
    """While running, publish `log`'s records and reopen it on `signum`.

    The signal handler chains to the one it replaced (twistd's ``--logfile``
    rotation on SIGUSR1) and restores it when the service stops.
    """

    def __init__(
        self,
        log: AccessLogFile,
        signum: int = signal.SIGUSR1,
        reactor: Optional[IReactorFromThreads] = None,
    ) -> None:
        self.log = log
        self.signum = signum
        self._reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        reactor = self._reactor or cast(IReactorFromThreads, global_reactor())
        previous = signal.getsignal(self.signum)

        def reopen(signum: int, frame: Any) -> None:
            reactor.callFromThread(self.log.reopen)
            if callable(previous):
                previous(signum, frame)

        self._previous = previous
        signal.signal(self.signum, reopen)
        globalLogPublisher.addObserver(self.log)

    def stopService(self) -> None:
        globalLogPublisher.removeObserver(self.log)
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None
        self.log.close()
        super().stopService()


def _without_record(event: LogEvent) -> str:
    """An event as one JSON line; the record value itself is left out (its
    fields are in the event already)."""
    if "access_record" in event:
        event = {key: value for key, value in event.items() if key != "access_record"}
    return eventAsJSON(event) + "\n"


def observer(environ: Optional[dict[str, str]] = None) -> ILogObserver:
    """`twistd --logger socksident.jsonlog.observer`: every event as JSON.

    Writes to the file ``$SOCKSIDENT_JSON_LOG`` names (appending), or to
    standard output when it is unset or ``-`` (journald, a container log).
    Each event is one line, written with one ``write``.
    """
    path = (environ if environ is not None else dict(os.environ)).get(JSON_LOG_ENV, "-")
    out: IO[str]
    if path == "-":
        out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    else:
        out = open(path, "a", buffering=1, encoding="utf-8")
    formatter: Callable[[LogEvent], Optional[str]] = _without_record
    return FileLogObserver(out, formatter)
