"""`workerevents`: a worker's log events as lines, and the same events back in the parent."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twisted.logger import LogLevel, formatEventAsClassicLogText, globalLogPublisher
from twisted.python.failure import Failure

from socksident.accesslog import ACCESS_NAMESPACE, FIELDS, access_fields, emit
from socksident.ident import IdentAnswer, IdentOutcome
from socksident.workerevents import event_from_line, event_to_line
from test_accesslog import record


def emitted(**changes: Any) -> dict[str, Any]:
    """The event `accesslog.emit` publishes for a record."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        emit(record(**changes))
    finally:
        globalLogPublisher.removeObserver(events.append)
    (event,) = [e for e in events if e.get("log_namespace") == ACCESS_NAMESPACE]
    return event


def test_an_access_event_goes_as_one_compact_line() -> None:
    line = event_to_line(emitted())
    assert line.startswith("A{") and line.endswith("\n") and line.count("\n") == 1
    assert "access_record" not in line and "log_logger" not in line


def test_the_parent_rebuilds_the_event_an_in_process_emit_makes() -> None:
    ident = IdentAnswer(IdentOutcome.USER, user_id="alice", opsys="UNIX", duration=0.25)
    original = emitted(ident=ident, reason="line\nbreak")
    rebuilt = event_from_line(event_to_line(original))
    assert formatEventAsClassicLogText(rebuilt) == formatEventAsClassicLogText(original)
    assert access_fields(rebuilt) == access_fields(original)  # what metrics and the JSON log read
    assert rebuilt["log_level"] is LogLevel.info and rebuilt["log_namespace"] == ACCESS_NAMESPACE
    assert rebuilt["log_time"] == original["log_time"]
    assert "log_source" in rebuilt and rebuilt["log_source"] is original["log_source"]
    assert all(rebuilt[name] == original[name] for name in FIELDS)


def test_other_events_keep_twisteds_json_and_lose_only_the_record_value() -> None:
    line = event_to_line({"log_format": "{summary}", "summary": "a\nb", "access_record": object(),
                          "log_level": LogLevel.info, "log_namespace": "elsewhere"})
    assert line.startswith("{") and line.count("\n") == 1
    event = event_from_line(line)
    assert event["summary"] == "a\nb" and "access_record" not in event
    assert event["log_level"] is LogLevel.info


def test_a_failure_travels_as_its_text_and_the_workers_copy_is_untouched() -> None:
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    line = event_to_line({"log_format": "oops", "log_failure": failure,
                          "log_level": LogLevel.critical, "log_time": 1.0})
    text = formatEventAsClassicLogText(event_from_line(line))
    assert "ZeroDivisionError: division by zero" in text and "Traceback" in text
    assert isinstance(failure.value, ZeroDivisionError)


@pytest.mark.parametrize("line", ["A{", "not json"])
def test_a_line_that_is_not_json_is_a_value_error(line: str) -> None:
    with pytest.raises(ValueError):
        event_from_line(line)


@pytest.mark.parametrize("line", ["A[]", 'A{"t": 1.0, "s": "x"}', 'A{"f": []}'])
def test_an_access_line_without_its_fields_says_so(line: str) -> None:
    with pytest.raises(ValueError, match="^an access event without its fields$"):
        event_from_line(line)


def test_the_compact_line_is_plain_json_after_its_tag_without_spaces() -> None:
    line = event_to_line(emitted())
    compact = json.loads(line[1:])
    assert set(compact) == {"t", "s", "f"} and list(compact["f"]) == list(FIELDS)
    assert line == "A" + json.dumps(compact, separators=(",", ":")) + "\n"
