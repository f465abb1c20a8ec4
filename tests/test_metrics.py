"""Prometheus metrics from access records and live counts, without a network."""

from __future__ import annotations

import sys

import pytest
from prometheus_client import CollectorRegistry
from test_accesslog import record
from twisted.python import usage
from twisted.web.test.requesthelper import DummyRequest

from socksident.accesslog import emit
from socksident.ident import IdentAnswer, IdentOutcome
from socksident.metrics import Metrics, MetricsResource, MetricsService
from socksident.server import LiveCounts
from socksident.socks4 import Command, ReplyCode, Request, RequestRejectedOrFailed


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_requests_refusals_ident_grant_and_bytes() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.record(record(time_to_grant=0.02))
    metrics.record(record(
        replies=(ReplyCode.REJECTED,), refusal=RequestRejectedOrFailed("no"), bytes_up=0,
        bytes_down=0, ident=IdentAnswer(IdentOutcome.NO_ANSWER, error="refused", duration=0.5)))
    metrics.record(record(request=None, replies=(), bytes_up=0, bytes_down=0))
    metrics.record(record(request=Request(Command.BIND, 21, "192.0.2.7", "alice"),
                          ident=IdentAnswer(IdentOutcome.USER, user_id="alice", duration=0.004),
                          replies=(ReplyCode.GRANTED, ReplyCode.GRANTED),
                          time_to_grant=3.0, bytes_up=5, bytes_down=7))
    assert value(metrics, "socksident_requests_total", command="CONNECT", code="90") == 1
    assert value(metrics, "socksident_requests_total", command="CONNECT", code="91") == 1
    assert value(metrics, "socksident_requests_total", command="none", code="none") == 1
    assert value(metrics, "socksident_requests_total", command="BIND", code="90") == 1
    assert value(metrics, "socksident_refusals_total", refusal="RequestRejectedOrFailed") == 1
    assert value(metrics, "socksident_ident_answers_total", outcome="no-answer") == 1
    assert value(metrics, "socksident_ident_answers_total", outcome="user") == 1
    assert value(metrics, "socksident_ident_duration_seconds_count") == 2
    assert value(metrics, "socksident_ident_duration_seconds_bucket", le="0.005") == 1
    assert value(metrics, "socksident_time_to_grant_seconds_count") == 2
    assert value(metrics, "socksident_time_to_grant_seconds_bucket", le="0.025") == 1
    assert value(metrics, "socksident_relayed_bytes_total", direction="up") == 15
    assert value(metrics, "socksident_relayed_bytes_total", direction="down") == 2007


def test_gauges_follow_the_live_counts() -> None:
    metrics = Metrics(CollectorRegistry())
    live = LiveCounts()
    live.change("connections", +1)
    metrics.watch(live)
    live.change("connections", +1)
    live.change("relays", +1)
    live.change("connections", -1)
    assert value(metrics, "socksident_open_connections") == 1
    assert value(metrics, "socksident_active_relays") == 1


def test_the_service_observes_access_events_while_running() -> None:
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.internet.testing import MemoryReactor

    metrics = Metrics(CollectorRegistry())
    reactor = MemoryReactor()
    service = MetricsService(metrics, TCP4ServerEndpoint(reactor, 9108), LiveCounts())
    service.startService()
    emit(record())
    service.stopService()
    emit(record())
    assert value(metrics, "socksident_requests_total", command="CONNECT", code="90") == 1
    assert reactor.tcpServers[0][0] == 9108


def test_the_resource_serves_the_text_format() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.record(record())
    request = DummyRequest([b"metrics"])
    body = MetricsResource(metrics.registry).render_GET(request)  # type: ignore[arg-type]
    assert b'socksident_requests_total{code="90",command="CONNECT"} 1.0' in body
    assert request.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain")


def test_metrics_without_prometheus_client_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from socksident.tap import Options

    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "socksident.metrics")
    with pytest.raises(usage.UsageError, match=r"^--metrics needs prometheus_client .*"
                       r"pip install 'socksident\[metrics\]'$"):
        Options().parseOptions(["--metrics", "tcp:9108:interface=127.0.0.1"])


def test_a_metrics_endpoint_that_does_not_parse_is_a_usage_error() -> None:
    from socksident.tap import Options

    with pytest.raises(usage.UsageError, match="--metrics 'bogus:1'"):
        Options().parseOptions(["--metrics", "bogus:1"])


_WORKER = """
import sys
sys.path[:0] = sys.argv[1:]
from test_accesslog import record
from socksident.metrics import Metrics
from socksident.server import LiveCounts
from socksident.socks4 import ReplyCode
metrics = Metrics()
live = LiveCounts()
metrics.watch(live)
live.change("connections", 2)
metrics.record(record())
metrics.record(record(replies=(ReplyCode.REJECTED,), bytes_up=0, bytes_down=0))
print(__import__("os").getpid())
"""


def test_the_parent_serves_the_sum_of_the_workers_and_drops_dead_ones_gauges() -> None:
    """Two worker processes count into the directory the parent made."""
    import os
    import subprocess
    from pathlib import Path

    from socksident.metrics import MULTIPROC_ENV, AggregatedMetricsService

    environ: dict[str, str] = {}
    parent = AggregatedMetricsService(None, environ)  # type: ignore[arg-type]
    for child in list(parent):
        child.disownServiceParent()  # no listener: read the registry directly
    parent.startService()
    directory = environ[MULTIPROC_ENV]
    assert oct(os.stat(directory).st_mode & 0o777) == "0o700"
    here = str(Path(__file__).parent)
    source = str(Path(__file__).parent.parent)
    pids = [int(subprocess.run(
        [sys.executable, "-c", _WORKER, here, source], env={**os.environ, **environ},
        check=True, capture_output=True, text=True).stdout) for _ in range(2)]
    sample = parent.registry.get_sample_value
    assert sample("socksident_requests_total", {"command": "CONNECT", "code": "90"}) == 2
    assert sample("socksident_requests_total", {"command": "CONNECT", "code": "91"}) == 2
    assert sample("socksident_relayed_bytes_total", {"direction": "down"}) == 4000
    assert sample("socksident_open_connections", {}) == 4
    parent.worker_exited(pids[0])
    assert sample("socksident_open_connections", {}) == 2
    assert sample("socksident_requests_total", {"command": "CONNECT", "code": "90"}) == 2
    parent.stopService()
    assert not os.path.exists(directory) and MULTIPROC_ENV not in environ
