"""The soak: thousands of requests of every kind through one real twistd, then no leak.

`soak_scenario.py` runs under ``unshare -n`` (oidentd binds port 113 there):
one ``twistd socks4 --rules`` serves the mix (CONNECT with data, refused port,
SOCKS4A by name, unresolvable name, bad version, half a request then close,
unknown command, reset after the reply, BIND, ident against oidentd, refused
by the rules).  Afterwards the server's descriptors are back to their
baseline, its RSS within `RSS_MARGIN_KIB` of it, and its log holds no
traceback and no unhandled error.

CI runs the short form (`SHORT` requests); ``make soak`` the long one
(``SOCKSIDENT_SOAK_REQUESTS``, 100,000 by default there).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import skip_unless_strict

HERE = Path(__file__).resolve().parent
SEARCH_PATH = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
SHORT = 3300
RSS_MARGIN_KIB = 8 * 1024


def _skip_reason() -> str | None:
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        return "the soak needs root and Linux network namespaces (oidentd on port 113)"
    for tool, package in (("unshare", "util-linux"), ("ip", "iproute2"), ("oidentd", "oidentd")):
        if shutil.which(tool, path=SEARCH_PATH) is None:
            return f"the soak needs {tool} (Debian package {package}; make test installs it)"
    return None


@pytest.mark.slow
def test_soak_leaves_no_descriptor_memory_or_error_behind():
    reason = _skip_reason()
    if reason:
        skip_unless_strict(reason)
    requests = int(os.environ.get("SOCKSIDENT_SOAK_REQUESTS", SHORT))
    command = [
        shutil.which("unshare", path=SEARCH_PATH), "-n", "--",
        sys.executable, str(HERE / "soak_scenario.py"),
        "--requests", str(requests),
        "--oidentd", shutil.which("oidentd", path=SEARCH_PATH),
        "--parent-netns", os.readlink("/proc/self/ns/net"),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PATH=SEARCH_PATH), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600 + requests / 20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=10)
        pytest.fail("the soak did not end; stderr:\n" + stderr.decode(errors="replace"))
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, stderr.decode(errors="replace")
    result = json.loads(stdout)
    print("soak:", json.dumps(result))
    assert result["error_count"] == 0, result["errors"]
    assert result["poison"] == [], result["poison"]
    assert result["access_lines"] == result["warmup"] + requests
    assert all(count >= requests // 11 for count in result["kinds"].values()), result["kinds"]
    assert result["ident_answers"] >= result["kinds"]["ident"]  # oidentd answered each
    assert result["after"]["fds"] <= result["before"]["fds"], result
    growth = result["after"]["rss_kib"] - result["before"]["rss_kib"]
    assert growth <= RSS_MARGIN_KIB, f"RSS grew by {growth} KiB: {result}"
