"""The line format of log events from a worker to its parent (`--workers N`).

Every event goes up as one line.  Most are Twisted's own JSON
(`eventAsJSON`), which keeps any event's fields and a failure's text.  An
access event, one per connection, is the parent's main load: Twisted's
generic JSON flattens it and reads it back through hooks, and a profile of
``--workers 2`` under load had the parent busy for about half a core on
that and each worker spending a seventh of its time encoding.  So it goes as
``A`` and plain JSON of the access record's fields, its text and its time,
and the parent rebuilds the same event an in-process `accesslog.emit` makes.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from twisted.logger import eventAsJSON, eventFromJSON
from twisted.python import reflect
from twisted.python.failure import Failure

from socksident.accesslog import ACCESS_NAMESPACE, FIELDS, access_event

__all__ = ["event_from_line", "event_to_line"]

_ACCESS = "A"


def event_to_line(event: dict[str, Any]) -> str:
    """`event` as one line of text, newline included."""
    if event.get("log_namespace") == ACCESS_NAMESPACE and "access_record" in event:
        fields = {name: event.get(name) for name in FIELDS}
        compact = {"t": event.get("log_time"), "s": event.get("summary"), "f": fields}
        return _ACCESS + json.dumps(compact, separators=(",", ":")) + "\n"
    event = dict(event)
    event.pop("access_record", None)  # its fields are in the event
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        # An exception does not survive JSON; its text does.
        failure = copy.copy(failure)
        failure.value = reflect.safe_str(failure.value)  # type: ignore[assignment]
        event["log_failure"] = failure
    return eventAsJSON(event) + "\n"


def event_from_line(text: str) -> dict[str, Any]:
    """The event a line of `event_to_line` carries; ValueError if it is not one."""
    if not text.startswith(_ACCESS):
        return eventFromJSON(text)
    compact = json.loads(text[len(_ACCESS):])
    if not isinstance(compact, dict) or not isinstance(compact.get("f"), dict):
        raise ValueError("an access event without its fields")
    fields = compact["f"]
    return access_event(
        {name: fields.get(name) for name in FIELDS}, compact.get("s"), compact.get("t")
    )
