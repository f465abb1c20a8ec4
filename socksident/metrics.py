"""Prometheus metrics, fed by the access records and the live counts.

`Metrics` is an access-log observer: each finished request's `fields()`
(the one schema) becomes counter and histogram updates; the factory's
`LiveCounts` watchers move the two gauges.  `MetricsResource` serves the
text format over twisted.web without threads.

Under ``--workers N`` the parent alone serves the endpoint
(`AggregatedMetricsService`): it makes a private directory, hands it to the
workers as ``PROMETHEUS_MULTIPROC_DIR`` in their environment (set before
they import prometheus_client, which picks its value store at import), and
serves the sum of every worker's files.  Each worker counts its own
requests into its files (`MetricsService` without an endpoint).  Counters
of a worker that died stay in the sum; its gauges (``livesum``) are
dropped when the parent marks it dead; the directory goes when the parent
stops.

Needs the optional extra: ``pip install socksident[metrics]``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, MutableMapping, Optional

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from twisted.application import internet, service
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from socksident.accesslog import AccessRecord
from socksident.livecounts import LiveCounts

__all__ = [
    "MULTIPROC_ENV",
    "AggregatedMetricsService",
    "Metrics",
    "MetricsResource",
    "MetricsService",
    "multiprocess",
]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Seconds; ident answers within the 15 s limit, grants within the 120 s one.
_IDENT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0)
_GRANT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                  30.0, 60.0, 120.0)


def multiprocess() -> bool:
    """Whether prometheus_client runs in its multiprocess mode here."""
    return bool(os.environ.get(MULTIPROC_ENV))


@implementer(ILogObserver)
class Metrics:
    """The server's metrics in `registry`, updated from access events.

    In multiprocess mode the metrics live in the shared files and `registry`
    holds the collector that sums them; otherwise they are registered in
    `registry` with the process's own CPU and memory figures.
    """

    def __init__(self, registry: Optional[CollectorRegistry] = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        shared = multiprocess()
        into: Optional[CollectorRegistry] = None if shared else self.registry
        if shared:
            MultiProcessCollector(self.registry)
        else:
            ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "socksident_requests", "Finished client connections by command and reply code "
            "(code none: no reply settled it).", ["command", "code"], registry=into)
        self.refusals = Counter(
            "socksident_refusals", "Refused requests by refusal class.", ["refusal"],
            registry=into)
        self.ident_answers = Counter(
            "socksident_ident_answers", "Ident queries by outcome.", ["outcome"],
            registry=into)
        self.ident_seconds = Histogram(
            "socksident_ident_duration_seconds", "Time an ident query took.",
            buckets=_IDENT_BUCKETS, registry=into)
        self.grant_seconds = Histogram(
            "socksident_time_to_grant_seconds",
            "Seconds from accepting a client to its reply 90 (BIND: the second).",
            buckets=_GRANT_BUCKETS, registry=into)
        self.relayed_bytes = Counter(
            "socksident_relayed_bytes", "Bytes relayed, up (client to destination) and down.",
            ["direction"], registry=into)
        self.open_connections = Gauge(
            "socksident_open_connections", "Client connections open now.",
            registry=into, multiprocess_mode="livesum")
        self.active_relays = Gauge(
            "socksident_active_relays", "Relays running now.",
            registry=into, multiprocess_mode="livesum")
        for direction in ("up", "down"):
            self.relayed_bytes.labels(direction)

    def watch(self, live: LiveCounts) -> None:
        """Move the gauges with `live` from now on."""
        gauges = {"connections": self.open_connections, "relays": self.active_relays}
        gauges["connections"].inc(live.connections)
        gauges["relays"].inc(live.relays)
        live.watchers.append(lambda what, delta: gauges[what].inc(delta))

    def record(self, record: AccessRecord) -> None:
        fields = record.fields()
        self.requests.labels(
            fields["command"] or "none",
            "none" if fields["code"] is None else str(fields["code"]),
        ).inc()
        if fields["refusal"] is not None:
            self.refusals.labels(fields["refusal"]).inc()
        if fields["ident_outcome"] is not None:
            self.ident_answers.labels(fields["ident_outcome"]).inc()
            if fields["ident_duration"] is not None:
                self.ident_seconds.observe(fields["ident_duration"])
        if fields["time_to_grant"] is not None:
            self.grant_seconds.observe(fields["time_to_grant"])
        if fields["bytes_up"]:
            self.relayed_bytes.labels("up").inc(fields["bytes_up"])
        if fields["bytes_down"]:
            self.relayed_bytes.labels("down").inc(fields["bytes_down"])

    def __call__(self, event: LogEvent) -> None:
        record = event.get("access_record")
        if isinstance(record, AccessRecord):
            self.record(record)


class MetricsResource(Resource):
    """GET anything: the registry in Prometheus text format."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self.registry)


def _serve(registry: CollectorRegistry, endpoint: Any, parent: service.MultiService) -> None:
    """`registry` on `endpoint`; a listening failure stops start-up (as a `--port` does)."""
    site = Site(MetricsResource(registry))
    site.noisy = False
    listener = internet.StreamServerEndpointService(endpoint, site)
    listener._raiseSynchronously = True
    listener.setServiceParent(parent)


class MetricsService(service.MultiService):
    """While running: `metrics` observes the access events and `endpoint`
    serves them.  A worker passes no endpoint: its parent serves the sum."""

    def __init__(self, metrics: Metrics, endpoint: Any, live: LiveCounts) -> None:
        super().__init__()
        self.metrics = metrics
        metrics.watch(live)
        if endpoint is not None:
            _serve(metrics.registry, endpoint, self)

    def startService(self) -> None:
        globalLogPublisher.addObserver(self.metrics)
        super().startService()

    def stopService(self) -> Any:
        globalLogPublisher.removeObserver(self.metrics)
        return super().stopService()


class AggregatedMetricsService(service.MultiService):
    """The parent of ``--workers N``: serves the sum of the workers' metrics.

    On start it makes a private directory (mode 0700, after twistd has
    dropped privileges, so the workers can write there) and puts it into
    `environ`, the environment the workers are started with; it must start
    before the pool.  `worker_exited` drops a dead worker's gauges.  On stop
    (after the workers have stopped) it removes the directory.
    """

    def __init__(self, endpoint: Any, environ: MutableMapping[str, str]) -> None:
        super().__init__()
        self.environ = environ
        self.directory: Optional[str] = None
        self.registry = CollectorRegistry()
        self._collector: Optional[MultiProcessCollector] = None
        _serve(self.registry, endpoint, self)

    def startService(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="socksident-metrics-")
        self.environ[MULTIPROC_ENV] = self.directory
        self._collector = MultiProcessCollector(self.registry, path=self.directory)
        super().startService()

    def worker_exited(self, pid: int) -> None:
        """A worker is gone: its live gauges leave the sum, its counts stay."""
        if self.directory is not None:
            mark_process_dead(pid, self.directory)

    def stopService(self) -> Any:
        stopped = super().stopService()
        if self._collector is not None:
            self.registry.unregister(self._collector)
            self._collector = None
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.environ.pop(MULTIPROC_ENV, None)
            self.directory = None
        return stopped
