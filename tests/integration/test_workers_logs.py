"""`--workers 2 --metrics ... --access-log ...`: one writer, one endpoint, the sum.

`workers_logs_scenario.py` runs once per module under ``unshare -n``
(fixed ports, clients on twelve loopback addresses, so both workers serve)
and reports JSON; each test below checks one part: the parent's /metrics
counts what both workers did, its gauges follow live relays and drop a
killed worker's, the access log has exactly one whole JSON line per
request, rotation with SIGUSR1 under load loses and halves none, and the
metrics directory goes with the parent.

Needs root (network namespaces), unshare (util-linux) and ip (iproute2).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from .conftest import skip_unless_strict
from .workers_scenario import CLIENTS

HERE = Path(__file__).resolve().parent
SCENARIO = HERE / "workers_logs_scenario.py"
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
TIMEOUT = 180
REQUESTS = "socksident_requests_total{code=%s,command=CONNECT}"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if os.geteuid() != 0:
        skip_unless_strict("--workers scenario needs root for unshare -n")
    for tool, package in (("unshare", "util-linux"), ("ip", "iproute2")):
        if shutil.which(tool, path=SEARCH_PATH) is None:
            skip_unless_strict(f"needs {tool} ({package})")
    workdir = tmp_path_factory.mktemp("workers-logs")
    env = dict(os.environ, PATH=SEARCH_PATH)
    run = subprocess.run(
        ["unshare", "-n", sys.executable, str(SCENARIO), str(workdir)],
        capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=HERE,
    )
    assert run.returncode == 0, run.stderr
    result: dict[str, Any] = json.loads(run.stdout)
    assert "error" not in result, result["error"] + "\n" + result.get("log", "")
    return result


def test_the_parent_serves_metrics_that_count_what_both_workers_did(report):
    assert report["counts_workers"] == [0, 1]  # both workers served some
    assert all(c["code"] == 90 and c["echoed"] for c in report["connects"])
    assert report["refused_codes"] == [91] * len(CLIENTS)
    metrics = report["counts_metrics"]
    assert metrics[REQUESTS % 90] == len(report["connects"]) == 3 * len(CLIENTS)
    assert metrics[REQUESTS % 91] == len(CLIENTS)
    assert metrics["socksident_refusals_total{refusal=ConnectFailed}"] == len(CLIENTS)
    echoed = sum(len(f"{c['source']}-0") for c in report["connects"])
    assert metrics["socksident_relayed_bytes_total{direction=up}"] == echoed
    assert metrics["socksident_relayed_bytes_total{direction=down}"] == echoed
    assert metrics["socksident_time_to_grant_seconds_count{}"] == len(report["connects"])
    assert metrics["socksident_open_connections{}"] == 0
    assert "Address already in use" not in report["log"]  # no worker tried the endpoint


def test_gauges_follow_live_relays_and_drop_a_killed_workers(report):
    held = report["held_metrics"]
    assert (held["socksident_open_connections{}"], held["socksident_active_relays{}"]) == (2, 2)
    after = report["after_kill_metrics"]
    assert (after["socksident_open_connections{}"], after["socksident_active_relays{}"]) == (0, 0)
    # what the dead worker counted stays in the sum
    assert after[REQUESTS % 90] == report["counts_metrics"][REQUESTS % 90]


def test_the_access_log_has_one_whole_json_line_per_request(report):
    first = report["counts_records"]
    assert first["whole"] and first["files"] == [["access.json", len(first["records"])]]
    served = Counter(f"{c['source']}:{c['port']}" for c in report["connects"])
    logged = Counter(r["client"] for r in first["records"] if r["code"] == 90)
    assert logged == served and set(served.values()) == {1}
    assert Counter(r["code"] for r in first["records"]) == {90: 36, 91: len(CLIENTS)}


def test_rotation_under_load_loses_and_halves_no_record(report):
    assert report["load_errors"] == [] and report["load_codes"] == [91]
    final = report["final_records"]
    assert final["whole"]
    names = [name for name, _ in final["files"]]
    assert names == ["access.json", "access.json.1", "access.json.2", "access.json.3"]
    assert all(count > 0 for _, count in final["files"])  # each reopen took effect
    records = final["records"]
    assert len(records) == len(report["counts_records"]["records"]) + report["load_count"]
    by_host = Counter(r["client"].rsplit(":", 1)[0] for r in records if r["code"] == 91)
    for source in report["load_sources"]:
        assert by_host[source] == 1 + 100, source  # one refused each before, 100 under load
    metrics = report["rotation_metrics"]
    assert metrics[REQUESTS % 90] + metrics[REQUESTS % 91] == len(records)


def test_the_parent_exits_0_and_removes_its_metrics_directory(report):
    assert len(report["metrics_dirs"]) == 1
    assert report["exit_status"] == 0, report["log"][-3000:]
    assert report["metrics_dirs_after"] == []
    assert "Traceback" not in report["log"]
