"""`twistd socks4 --workers 2`: real processes, in a private network namespace.

`workers_scenario.py` runs once per module under ``unshare -n`` (fixed
ports, clients on twelve IPv4 and eight IPv6 loopback addresses, a tcp
and a tcp6 --port) and reports JSON; each test
below checks one part: every client host always reaches the worker the BPF
program names, BIND after CONNECT works for every host, a killed worker is
restarted and serves its hosts, one SIGHUP reloads the rules in every
worker, SIGTERM stops all of them and the parent exits 0, and a busy port
stops start-up naming it.

Needs root (network namespaces), unshare (util-linux) and ip (iproute2).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from socksident.reuseport import worker_for

from .conftest import skip_unless_strict

HERE = Path(__file__).resolve().parent
SCENARIO = HERE / "workers_scenario.py"
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
TIMEOUT = 120


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if os.geteuid() != 0:
        skip_unless_strict("--workers scenario needs root for unshare -n")
    for tool, package in (("unshare", "util-linux"), ("ip", "iproute2")):
        if shutil.which(tool, path=SEARCH_PATH) is None:
            skip_unless_strict(f"needs {tool} ({package})")
    workdir = tmp_path_factory.mktemp("workers")
    env = dict(os.environ, PATH=SEARCH_PATH)
    run = subprocess.run(
        ["unshare", "-n", sys.executable, str(SCENARIO), str(workdir)],
        capture_output=True, text=True, timeout=TIMEOUT, env=env,
    )
    assert run.returncode == 0, run.stderr
    result: dict[str, Any] = json.loads(run.stdout)
    assert "error" not in result, result["error"] + "\n" + result.get("log", "")
    return result


def test_each_client_host_always_reaches_the_worker_the_program_names(report):
    workers = defaultdict(set)
    for connect in report["affinity"]:
        assert connect["code"] == 90 and connect["echoed"], connect
        workers[connect["source"]].add(connect["worker"])
    assert len(workers) == 12 + 8  # IPv4 on the tcp port, IPv6 on the tcp6 port
    for source, seen in workers.items():
        assert seen == {worker_for(source, 2)}, (source, seen)
    assert set().union(*workers.values()) == {0, 1}  # both workers served


def test_bind_after_connect_works_for_every_host(report):
    for bind in report["bind"]:
        assert (bind["connect"], bind["first"], bind["second"]) == (90, 90, 90), bind
        assert bind["down"], bind


def test_a_killed_worker_is_restarted_and_serves_its_hosts(report):
    assert report["restart_lines"], report["log"]
    assert "killed by SIGKILL" in report["restart_lines"][0]
    assert report["restarted_pid"] != report["pids"]["0"]
    for connect in report["after_restart"]:
        assert (connect["code"], connect["echoed"], connect["worker"]) == (90, True, 0), connect


def test_one_sighup_reloads_the_rules_in_every_worker(report):
    reloaded_by = {line.split("worker ")[1].split("]")[0] for line in report["reload_lines"]}
    assert reloaded_by == {"0", "1"}
    assert {c["worker"] for c in report["after_reload"]} == {0, 1}
    assert all(c["code"] == 91 for c in report["after_reload"]), report["after_reload"]


def test_sigterm_stops_every_worker_and_the_parent_exits_0(report):
    assert report["exit_status"] == 0, report["log"][-3000:]
    assert report["alive_after_exit"] == []
    assert len(report["stop_lines"]) == 2
    assert all("exited with status 0" in line for line in report["stop_lines"])
    assert "Traceback" not in report["log"]


def test_a_busy_port_stops_start_up_naming_it(report):
    assert report["busy_status"] != 0
    assert "--port tcp:1081:interface=127.0.0.1: [Errno 98]" in report["busy_log"]
