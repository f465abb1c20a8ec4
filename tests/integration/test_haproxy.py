"""Two `twistd socks4` behind a real HAProxy (send-proxy and send-proxy-v2).

`haproxy_scenario.py` runs once per module under ``unshare -n`` (clients on
eight addresses of lo, HAProxy on 10.0.0.1, oidentd on a client's address)
and reports JSON; each test below checks one part: the clients' reply codes,
that the access log and the rules (and a rule's command) see the real client
and never HAProxy's address, that a refused address gets 91 through the
balancer, that a client's half-close crosses it, that a connection which
bypasses the balancer is closed and logged, that health checks leave no
access record, and that ident is asked from the address the client connected to.

Needs root (network namespaces), unshare (util-linux), ip (iproute2),
haproxy and oidentd; `make test` installs the packages.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from .conftest import skip_unless_strict

HERE = Path(__file__).resolve().parent
SCENARIO = HERE / "haproxy_scenario.py"
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
TOOLS = {"unshare": "util-linux", "ip": "iproute2", "haproxy": "haproxy", "oidentd": "oidentd"}
TIMEOUT = 120
POISON = ("Traceback", "Unhandled error", "Unhandled Error")

# frontend -> (socksident process, the listener the header names)
ROUTES = {
    "v1": ("a", "10.0.0.1:1081"),
    "v2": ("b", "10.0.0.1:1082"),
    "elsewhere": ("b", "192.0.2.1:1083"),
}
EXPECTED_CODE = {
    "permitted": 90, "balanced": 90, "half-close": 90, "refused": 91,
    "ident": 90, "ident-mismatch": 93, "ident-elsewhere": 92,
}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if os.geteuid() != 0:
        skip_unless_strict("the HAProxy scenario needs root for unshare -n")
    for tool, package in TOOLS.items():
        if shutil.which(tool, path=SEARCH_PATH) is None:
            skip_unless_strict(f"needs {tool} (Debian package {package})")
    workdir = tmp_path_factory.mktemp("haproxy")
    command = [
        shutil.which("unshare", path=SEARCH_PATH), "-n", "--",
        sys.executable, str(SCENARIO), "--workdir", str(workdir),
        "--twistd", str(Path(sys.executable).with_name("twistd")),
        "--haproxy", shutil.which("haproxy", path=SEARCH_PATH),
        "--oidentd", shutil.which("oidentd", path=SEARCH_PATH),
        "--parent-netns", os.readlink("/proc/self/ns/net"),
    ]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PATH=SEARCH_PATH), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=10)
        pytest.fail(f"scenario ran longer than {TIMEOUT} s:\n" + stderr.decode(errors="replace"))
    finally:
        try:  # haproxy, twistd, oidentd: whatever is left in the session
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, stderr.decode(errors="replace")
    result: dict[str, Any] = json.loads(stdout)
    logs = "\n".join(f"--- {name}\n{text[-3000:]}" for name, text in result["logs"].items())
    assert "error" not in result, result["error"] + logs
    result["context"] = logs
    return result


def record_of(report: dict[str, Any], client: dict[str, Any]) -> dict[str, Any]:
    """The one access record naming this client's own address and port."""
    name = f"{client['source']}:{client['port']}"
    found = [r for r in report["records"] if r["client"] == name]
    assert len(found) == 1, (client, found)
    return found[0]


def cases(report: dict[str, Any], *names: str) -> list[dict[str, Any]]:
    found = [c for c in report["clients"] if c["case"] in names]
    assert found, names
    return found


def test_each_client_gets_the_reply_its_address_and_user_call_for(report):
    for client in report["clients"]:
        assert client["code"] == EXPECTED_CODE[client["case"]], client
        if client["code"] == 90 and client["case"] != "half-close":
            assert client["echoed"], client
        if client["code"] != 90:
            assert client["after_reply"] == "", client  # refused: closed, nothing relayed


def test_the_access_log_names_the_real_client_never_the_balancer(report):
    for client in report["clients"]:
        record = record_of(report, client)
        assert record["via"].startswith("127.0.0.1:"), record  # HAProxy's side
        assert record["code"] == client["code"], record
        assert record["user"] == client["user"], record
        if client["frontend"] in ROUTES:
            server, listener = ROUTES[client["frontend"]]
            assert (record["server"], record["listener"]) == (server, listener), record
        else:
            assert record["listener"] == "10.0.0.1:1080", record
    # every record is one of the scenario's connections: no record for
    # HAProxy's address, none for its health checks
    ours = {f"{c['source']}:{c['port']}" for c in report["clients"] + report["direct"]}
    assert Counter(r["client"] for r in report["records"]) == Counter(ours)


def test_a_refused_address_gets_91_through_the_balancer_by_its_rules_line(report):
    refused = cases(report, "refused")
    assert {c["frontend"] for c in refused} == {"v1", "v2"}
    for client in refused:
        record = record_of(report, client)
        assert record["rule"].endswith("sockd.conf:2"), record
        assert record["refusal"] == "RequestRejectedOrFailed", record
        assert record["bytes_up"] == record["bytes_down"] == 0, record


def test_the_rules_permit_by_the_real_client_and_their_command_sees_it(report):
    for client in cases(report, "permitted", "balanced", "half-close"):
        assert record_of(report, client)["rule"].endswith("sockd.conf:4"), client
    granted = Counter(f"{c['source']} tester"
                      for c in cases(report, "permitted", "balanced", "half-close"))
    assert Counter(report["commands"]) == granted


def test_both_processes_behind_the_round_robin_serve(report):
    servers = Counter(record_of(report, c)["server"] for c in cases(report, "balanced"))
    assert set(servers) == {"a", "b"}, servers


def test_a_half_close_crosses_the_balancer(report):
    half = cases(report, "half-close")
    assert {c["frontend"] for c in half} == {"v1", "v2"}
    for client in half:
        # the destination answered only after it saw the client's EOF
        assert client["answer"] == client["expected"], client
        record = record_of(report, client)
        assert record["bytes_up"] == 50_000, record
        assert record["bytes_down"] == len(client["expected"]), record


def test_a_connection_that_bypasses_the_balancer_is_closed_and_logged(report):
    reasons = {
        True: "PROXY listener: no PROXY header: the connection starts with b'\\x04\\x01",
        False: "no complete PROXY header within 2 s",
    }
    for client in report["direct"]:
        assert client["closed"] and client["received"] == "", client  # no SOCKS reply
        record = record_of(report, client)
        assert (record["code"], record["via"], record["user"]) == (None, None, None), record
        assert record["reason"].startswith(reasons[client["sent_request"]]), record
        assert record["server"] == client["server"], record


def test_health_checks_reach_b_and_leave_no_access_record(report):
    # v2 health checks send LOCAL headers; the record count check above
    # shows none of them was logged as a request
    assert "PROXY LOCAL connection from 127.0.0.1:" in report["logs"]["twistd-b"]
    assert " is DOWN" not in report["logs"]["haproxy"], report["logs"]["haproxy"]


def test_ident_is_asked_from_the_address_the_client_connected_to(report):
    listener_port = {"v1": 1081, "v2": 1082}
    for client in cases(report, "ident", "ident-mismatch"):
        seen = report["oidentd_peers"][str(client["port"])]
        assert seen["peer"] == "10.0.0.1", (client, seen)  # the header's destination
        wanted = f"{client['port']} , {listener_port[client['frontend']]} : root "
        assert any(wanted in line for line in seen["lines"]), (wanted, seen)
        record = record_of(report, client)
        assert (record["ident_outcome"], record["ident_user"]) == ("user", "root"), record


def test_ident_without_the_headers_destination_here_is_no_answer(report):
    (client,) = cases(report, "ident-elsewhere")
    assert report["oidentd_peers"][str(client["port"])]["lines"] == []  # never asked
    record = record_of(report, client)
    assert record["refusal"] == "IdentdUnreachable", record
    assert "cannot ask from 192.0.2.1, the address the client connected to" in record["reason"]


def test_no_server_logged_a_failure(report):
    for name in ("twistd-a", "twistd-b"):
        text = report["logs"][name]
        assert not [p for p in POISON if p in text], text[-3000:]
