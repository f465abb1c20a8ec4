"""IDENT against the real oidentd (Debian's), in a private network namespace.

`ident_oidentd_scenario.py` runs under ``unshare -n``, so oidentd can bind
127.0.0.1:113 and [::1]:113 without touching the machine: it starts oidentd,
four twistd ``socks4`` servers (``--ident``, ``--ident=check``, ``--ident``
against an identd that never answers, and ``--ident`` listening on ::1) and
destinations, runs real clients as root, nobody and daemon (a raw SOCKS4 probe
over IPv4 or IPv6 that sees the exact reply code, and curl), stops oidentd for
the no-identd cases, and reports JSON.  The scenario runs once per module;
each test below checks one case: the reply code, that data flows exactly when
granted, the access-log line (client address, code, claimed user, ident
outcome, reason) and what oidentd itself logged, and from which address it
was asked.

Needs root (network namespaces), unshare (util-linux), ip (iproute2),
runuser (util-linux), curl and oidentd; `make test` installs the packages.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest

from .conftest import skip_unless_strict

HERE = Path(__file__).resolve().parent
SCENARIO = HERE / "ident_oidentd_scenario.py"
SEARCH_PATH = os.pathsep.join(
    [os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"]
)
TOOLS = {  # command: Debian package
    "unshare": "util-linux",
    "runuser": "util-linux",
    "ip": "iproute2",
    "curl": "curl",
    "oidentd": "oidentd",
}
SCENARIO_TIMEOUT = 90


@dataclass(frozen=True)
class Expect:
    code: int
    ident: str  # the access log's ident= field
    reason: str  # a piece of the access log's reason
    oidentd: Optional[str]  # the user oidentd logged for the query; None: not asked
    client: str = "127.0.0.1"  # the client's address, and so the ident query's source


EXPECTED = {
    # oidentd answers with the real owner of the connection
    "require-root-as-root": Expect(90, "user:'root'", "loopback client", "root"),
    "require-root-claims-alice": Expect(
        93, "user:'root'", "identd names 'root', request claims 'alice'", "root"),
    "require-socks4a-root": Expect(90, "user:'root'", "loopback client", "root"),
    "require-nobody-curl": Expect(90, "user:'nobody'", "loopback client", "nobody"),
    "require-nobody-claims-root-curl": Expect(
        93, "user:'nobody'", "identd names 'nobody', request claims 'root'", "nobody"),
    "require-nobody-probe": Expect(90, "user:'nobody'", "loopback client", "nobody"),
    # oidentd is configured to hide "daemon": ERROR : HIDDEN-USER
    "require-hidden-daemon-curl": Expect(
        92, "error:HIDDEN-USER", "no ident answer: HIDDEN-USER", "HIDDEN-USER"),
    "check-root-as-root": Expect(90, "user:'root'", "loopback client", "root"),
    "check-root-claims-alice": Expect(
        93, "user:'root'", "identd names 'root', request claims 'alice'", "root"),
    "check-hidden-daemon-curl": Expect(
        90, "error:HIDDEN-USER", "unverified, no ident answer: HIDDEN-USER", "HIDDEN-USER"),
    # an identd that accepts and never answers, --ident-timeout 1
    "silent-identd-times-out": Expect(
        92, "no-answer", "no ident answer: no answer within 1 s", None),
    # oidentd stopped: port 113 refuses
    "require-no-identd": Expect(
        92, "no-answer", "no ident answer: connection refused", None),
    "check-no-identd": Expect(
        90, "no-answer", "unverified, no ident answer: connection refused", None),
    "check-no-identd-claims-alice": Expect(
        90, "no-answer", "unverified, no ident answer: connection refused", None),
    # the client reaches a proxy on [::1] over IPv6 (the destination stays
    # IPv4); the proxy asks oidentd on [::1]:113 from ::1
    "ipv6-require-root-as-root": Expect(
        90, "user:'root'", "loopback client", "root", client="::1"),
    "ipv6-require-root-claims-alice": Expect(
        93, "user:'root'", "identd names 'root', request claims 'alice'", "root", client="::1"),
}
IPV6_CASES = {name for name, expect in EXPECTED.items() if ":" in expect.client}


def _skip_reason() -> Optional[str]:
    if not sys.platform.startswith("linux"):
        return "needs Linux network namespaces (unshare -n) to run identd on port 113"
    if os.geteuid() != 0:
        return ("needs root to create a network namespace for identd on port 113 and to "
                "run clients as other users; run make test as root (CI does)")
    missing = [f"{tool} (Debian package {package})" for tool, package in TOOLS.items()
               if shutil.which(tool, path=SEARCH_PATH) is None]
    if missing:
        return ("needs " + ", ".join(missing)
                + "; make test installs them with apt-get when run as root")
    probe = subprocess.run(
        [shutil.which("unshare", path=SEARCH_PATH), "-n", "true"],
        capture_output=True, timeout=30)
    if probe.returncode != 0:
        return ("unshare -n failed even as root (a container without CAP_SYS_ADMIN? run it "
                f"with --cap-add SYS_ADMIN or --privileged): {probe.stderr.decode().strip()}")
    return None


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict:
    reason = _skip_reason()
    if reason:
        skip_unless_strict(reason)
    twistd = Path(sys.executable).parent / "twistd"
    assert twistd.exists(), f"no twistd next to {sys.executable}: is the package installed?"
    workdir = tmp_path_factory.mktemp("oidentd")
    env = dict(os.environ, PATH=SEARCH_PATH)
    command = [
        shutil.which("unshare", path=SEARCH_PATH), "-n", "--",
        sys.executable, str(SCENARIO),
        "--workdir", str(workdir),
        "--twistd", str(twistd),
        "--oidentd", shutil.which("oidentd", path=SEARCH_PATH),
        "--parent-netns", os.readlink("/proc/self/ns/net"),
    ]
    # Own session, so a hung run can be killed whole: oidentd, twistd, clients.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=SCENARIO_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=10)
        pytest.fail(f"scenario ran longer than {SCENARIO_TIMEOUT} s; stderr:\n"
                    + stderr.decode(errors="replace"))
    finally:
        try:  # anything left over in the namespace's process group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.returncode != 0:
        pytest.fail(f"scenario exited with {proc.returncode}; stderr:\n"
                    + stderr.decode(errors="replace"))
    result = json.loads(stdout)
    result["stderr"] = stderr.decode(errors="replace")
    return result


def _case(scenario: dict, name: str) -> dict[str, Any]:
    if name in scenario["skipped"]:
        skip_unless_strict(f"{name}: {scenario['skipped'][name]}")
    assert name in scenario["cases"], f"case {name} did not run:\n{scenario['stderr']}"
    return scenario["cases"][name]


def _context(scenario: dict, case: dict) -> str:
    return (f"\ncase: {json.dumps(case, indent=1)}"
            f"\n--- socks server log ({case['server']}):\n"
            f"{scenario['server_logs'][case['server']][-4000:]}"
            f"\n--- oidentd log:\n{scenario['oidentd_log'][-2000:]}")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_reply_code(scenario: dict, name: str) -> None:
    """The client sees exactly the reply code the ident outcome calls for."""
    case, expect = _case(scenario, name), EXPECTED[name]
    assert case["code"] == expect.code, _context(scenario, case)
    if case["client"] == "probe":
        assert case["reply_hex"][:4] == f"00{expect.code:02x}", _context(scenario, case)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_data_flows_only_when_granted(scenario: dict, name: str) -> None:
    """90 relays both ways; a refusal closes and the destination never hears of it."""
    case, expect = _case(scenario, name), EXPECTED[name]
    if case["client"] == "probe":
        seen, sent = scenario["echo_seen"], name
        if expect.code == 90:
            assert case.get("echo") == name + "\n", _context(scenario, case)
        else:
            assert case.get("after_reply") == "", _context(scenario, case)
    else:
        seen, sent = scenario["http_seen"], "/" + name
        if expect.code == 90:
            assert case["body"] == f"destination saw /{name}\n", _context(scenario, case)
        else:
            assert case["body"] == "", _context(scenario, case)
    assert (sent in seen) == (expect.code == 90), _context(scenario, case)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_access_log_line(scenario: dict, name: str) -> None:
    """One access-log line per request: claimed user, ident outcome, code, reason."""
    case, expect = _case(scenario, name), EXPECTED[name]
    line = case["log_line"]
    assert line is not None, "no access-log line for this request" + _context(scenario, case)
    if case["client"] == "probe":  # the probe's own socket: IPv6 for the IPv6 cases
        assert case["source_host"] == expect.client, _context(scenario, case)
    assert f"] {expect.client}:{case['source_port']} user=" in line, line
    assert f" user={case['claim']!r} " in line, line
    assert f" ident={expect.ident} " in line, line
    assert f" -> {expect.code} (" in line, line
    assert expect.reason in line, line


@pytest.mark.parametrize("name", list(EXPECTED))
def test_oidentd_was_asked(scenario: dict, name: str) -> None:
    """The answers come from the real oidentd, for this very connection."""
    case, expect = _case(scenario, name), EXPECTED[name]
    lines = case["oidentd_lines"]
    if expect.oidentd is None:
        assert lines == [], _context(scenario, case)
        return
    wanted = f"{case['source_port']} , {case['proxy_port']} : {expect.oidentd} "
    assert any(wanted in line for line in lines), f"{wanted!r} not in {lines!r}"
    # the query came from the client's address: over IPv6 for an IPv6 client
    assert case["oidentd_peer"] == expect.client, _context(scenario, case)


def test_oidentd_was_really_stopped(scenario: dict) -> None:
    """The no-identd cases ran with nothing on port 113, IPv4 or IPv6."""
    refuses = scenario["ident_port_refuses_after_stop"]
    assert "127.0.0.1" in refuses, scenario["stderr"]
    assert refuses == {address: True for address in refuses}, scenario["stderr"]


def test_ident_timeout_is_enforced(scenario: dict) -> None:
    """--ident-timeout 1 against a silent identd: 92 after about one second."""
    case = _case(scenario, "silent-identd-times-out")
    assert 0.9 <= case["elapsed"] < 2.5, _context(scenario, case)


def test_every_case_ran(scenario: dict) -> None:
    assert set(scenario["cases"]) | set(scenario["skipped"]) == set(EXPECTED)
    # only a client that needs a Python runnable by nobody may be skipped, and
    # the IPv6 cases on a kernel without IPv6
    skipped = scenario["skipped"]
    assert set(skipped) <= {"require-nobody-probe"} | IPV6_CASES, skipped
    assert all(skipped[name].startswith("no IPv6 loopback")
               for name in IPV6_CASES & set(skipped)), skipped
