"""The JSON access log file, its reopening on SIGUSR1, and the `--logger` factory."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.logger import Logger, globalLogPublisher

from socksident import jsonlog
from socksident.accesslog import emit
from socksident.jsonlog import AccessLogFile, ReopenOnSignal

from test_accesslog import record


class RunNow:
    """callFromThread, at once: the signal's work without a running reactor."""

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        f(*args, **kw)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_record_is_one_json_line_of_its_fields(tmp_path: Path) -> None:
    path = tmp_path / "access.json"
    log = AccessLogFile(str(path))
    log.write(record())
    log.write(record(reason="tab\tnew\nline \u00e9", duration=2.0))
    log.close()
    assert path.read_text().count("\n") == 2
    first, second = lines(path)
    assert first == record().fields()
    assert second["reason"] == "tab\tnew\nline \u00e9" and second["next_hop"] is None


def test_the_observer_takes_access_events_only(tmp_path: Path) -> None:
    path = tmp_path / "access.json"
    log = AccessLogFile(str(path))
    globalLogPublisher.addObserver(log)
    try:
        Logger().info("not an access event {x}", x=1)
        emit(record())
    finally:
        globalLogPublisher.removeObserver(log)
        log.close()
    assert lines(path) == [record().fields()]


def test_sigusr1_reopens_and_chains_to_the_previous_handler(tmp_path: Path) -> None:
    path = tmp_path / "access.json"
    log = AccessLogFile(str(path))
    seen: list[int] = []
    before = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        reopener = ReopenOnSignal(log, reactor=RunNow())  # type: ignore[arg-type]
        reopener.startService()
        emit(record(reason="before"))
        path.rename(tmp_path / "access.json.1")
        os.kill(os.getpid(), signal.SIGUSR1)
        emit(record(reason="after"))
        reopener.stopService()
        assert seen == [signal.SIGUSR1]
        os.kill(os.getpid(), signal.SIGUSR1)  # the previous handler is back
        assert seen == [signal.SIGUSR1, signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert [r["reason"] for r in lines(tmp_path / "access.json.1")] == ["before"]
    assert [r["reason"] for r in lines(path)] == ["after"]
    emit(record(reason="stopped"))
    assert len(lines(path)) == 1


def test_logger_factory_writes_every_event_as_json(tmp_path: Path) -> None:
    path = tmp_path / "all.json"
    observer = jsonlog.observer({jsonlog.JSON_LOG_ENV: str(path)})
    observer(dict(log_format="hello {who}", who="you", log_namespace="x", log_level=None))
    access: dict[str, Any] = {}
    globalLogPublisher.addObserver(lambda event: access.update(event))
    emit(record())
    observer(access)
    first, second = lines(path)
    assert first["who"] == "you" and first["log_format"] == "hello {who}"
    assert "access_record" not in second
    assert second["summary"] == record().summary()
    assert {key: second[key] for key in record().fields()} == record().fields()


def test_an_access_log_that_cannot_be_opened_is_a_usage_error(tmp_path: Path) -> None:
    from twisted.python import usage

    from socksident.tap import Options

    options = Options()
    with pytest.raises(usage.UsageError, match="--access-log .*/no/such/dir/a.json: No such"):
        options.parseOptions(["--access-log", str(tmp_path / "no/such/dir/a.json")])


def test_a_workers_access_event_is_written_as_the_same_line(tmp_path: Path) -> None:
    """Under --workers the parent gets the event as JSON: fields, no record."""
    from twisted.logger import eventAsJSON, eventFromJSON

    from socksident.accesslog import access_fields

    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        emit(record(reason="caf\u00e9", time_to_grant=0.25))
    finally:
        globalLogPublisher.removeObserver(seen.append)
    (event,) = seen
    forwarded = eventFromJSON(eventAsJSON(
        {key: value for key, value in event.items() if key != "access_record"}))
    assert "access_record" not in forwarded
    assert access_fields(forwarded) == record(reason="caf\u00e9", time_to_grant=0.25).fields()
    assert access_fields({"log_namespace": "socksident.access"}) is None
    assert access_fields({"log_namespace": "other", **record().fields()}) is None
    path = tmp_path / "access.json"
    log = AccessLogFile(str(path))
    log(forwarded)
    log.close()
    assert path.read_text() == json.dumps(record(reason="caf\u00e9", time_to_grant=0.25)
                                          .fields(), ensure_ascii=False) + "\n"


def test_fields_names_the_schema_in_order() -> None:
    from socksident.accesslog import FIELDS

    assert tuple(record().fields()) == FIELDS
