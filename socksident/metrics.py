"""Prometheus metrics, fed by the access records and the live counts.

`Metrics` is an access-log observer: each finished request's `fields()`
(the one schema) becomes counter and histogram updates; the factory's
`LiveCounts` watchers move the two gauges.  `MetricsResource` serves the
text format over twisted.web without threads.  With
``PROMETHEUS_MULTIPROC_DIR`` set, prometheus_client keeps the values in
files of that directory and every process's endpoint reports the sum of
all processes (the gauges as ``livesum``: processes that exited drop out).

Needs the optional extra: ``pip install socksident[metrics]``.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector
from twisted.application import internet, service
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from socksident.accesslog import AccessRecord
from socksident.livecounts import LiveCounts

__all__ = ["MULTIPROC_ENV", "Metrics", "MetricsResource", "MetricsService", "multiprocess"]

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


class MetricsService(service.MultiService):
    """While running: `metrics` observes the access events and `endpoint`
    serves them.  A listening failure stops start-up (as a `--port` does)."""

    def __init__(self, metrics: Metrics, endpoint: Any, live: LiveCounts) -> None:
        super().__init__()
        self.metrics = metrics
        metrics.watch(live)
        site = Site(MetricsResource(metrics.registry))
        site.noisy = False
        listener = internet.StreamServerEndpointService(endpoint, site)
        listener._raiseSynchronously = True
        listener.setServiceParent(self)

    def startService(self) -> None:
        globalLogPublisher.addObserver(self.metrics)
        super().startService()

    def stopService(self) -> Any:
        globalLogPublisher.removeObserver(self.metrics)
        return super().stopService()
