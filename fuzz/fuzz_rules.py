"""Fuzz target: the sockd.conf rules parser (`socksident.rules`).

Any text parses to a `RuleSet` or raises `RulesError`; nothing else escapes.
Lines naming user-list files (``*=/path``) would read this host's files, so
the target parses from an empty scratch directory where such paths are
relative and missing.
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

with atheris.instrument_imports(include=["socksident"]):
    from socksident.rules import RulesError, parse_rules

__all__ = ["TestOneInput"]


def TestOneInput(data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")
    if "=/" in text:  # an absolute user-list path: keep the fuzzer off the host's files
        text = text.replace("=/", "=")
    try:
        ruleset = parse_rules(text, "fuzz.conf")
    except RulesError:
        return
    assert ruleset is not None


if __name__ == "__main__":
    os.chdir(tempfile.mkdtemp(prefix="socksident-fuzz-rules-"))
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
