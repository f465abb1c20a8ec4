"""`twistd socks4 --rules FILE` end to end: real processes, real loopback sockets.

The proxy is the real ``twistd`` command in its own process, its stdout and
stderr going to files in the test's tmp_path; the destinations are threaded
stdlib echo servers on 127.0.0.1; the client is a raw, blocking SOCKS4
client.  Every wait polls with a deadline, and every process a test starts
is stopped (TERM, then KILL) when it ends, whatever happened.

These tests are synchronous: they never touch the reactor pytest-twisted
runs, so they block it only for their own duration.
"""

from __future__ import annotations

import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, TypeVar

import pytest

from socksident.socks4 import Command, ReplyCode, build_request

from .conftest import recv_exactly, skip_unless_strict

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "sockd.conf"
WAIT = 10.0  # seconds any one condition may take to come true
IO_TIMEOUT = 5.0  # per blocking socket operation

T = TypeVar("T")


def poll(check: Callable[[], T], what: str, timeout: float = WAIT) -> T:
    """Call `check` until it returns something true; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    """A port that was free a moment ago (bind to 0, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def clean_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    }


# -- destinations: threaded echo servers ----------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(IO_TIMEOUT)
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@pytest.fixture
def echo() -> Iterator[Callable[[], EchoServer]]:
    """Start echo servers on 127.0.0.1 (any port); all are shut down afterwards."""
    servers: list[tuple[EchoServer, threading.Thread]] = []

    def start() -> EchoServer:
        server = EchoServer((LOOPBACK, 0), _Echo)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        servers.append((server, thread))
        return server

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


# -- the client --------------------------------------------------------------------


def socks_connect(
    proxy_port: int, dest_port: int, user: str = "tester", payload: bytes = b"ping\n"
) -> tuple[int, bytes]:
    """CONNECT to 127.0.0.1:dest_port; (reply code, what came back for `payload`).

    On a refusal the proxy must close right after its 8-byte reply.
    """
    with socket.create_connection((LOOPBACK, proxy_port), timeout=IO_TIMEOUT) as sock:
        sock.settimeout(IO_TIMEOUT)
        sock.sendall(build_request(Command.CONNECT, dest_port, LOOPBACK, user))
        reply = recv_exactly(sock, 8)
        assert reply[0] == 0, reply
        code = reply[1]
        if code != ReplyCode.GRANTED:
            assert sock.recv(100) == b"", "the proxy did not close after refusing"
            return code, b""
        sock.sendall(payload)
        echoed = recv_exactly(sock, len(payload))
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(100) == b""  # the echo server closes on EOF, the relay follows
        return code, echoed


# -- twistd -----------------------------------------------------------------------------


class Twistd:
    """One `twistd -n socks4` process with its output in files."""

    def __init__(self, workdir: Path, *args: str) -> None:
        twistd = Path(sys.executable).with_name("twistd")
        if not twistd.exists():
            skip_unless_strict(f"no twistd next to {sys.executable}")
        self.port = free_port()
        self.stdout_path = workdir / "twistd.out"
        self.stderr_path = workdir / "twistd.err"
        argv = [
            str(twistd), "-n", "--pidfile=", "socks4",
            "--port", f"tcp:{self.port}:interface={LOOPBACK}", *args,
        ]
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                cwd=workdir, env=clean_env(),
            )

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def output(self) -> str:
        return self.stdout + self.stderr_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        """Until the announcement, logged once every service (SIGHUP's too) has started."""

        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"twistd exited with {self.process.returncode}:\n{self.output}"
                )
            return "socksident SOCKS4/4A server listening on" in self.stdout

        poll(ready, "twistd to start listening")

    def wait_for_line(self, *parts: str) -> str:
        """The first stdout line holding every one of `parts`."""

        def find() -> Optional[str]:
            return next(
                (line for line in self.stdout.splitlines() if all(p in line for p in parts)),
                None,
            )

        return poll(find, f"a twistd log line with {parts!r}")

    def hangup(self) -> None:
        assert self.process.poll() is None, self.output
        self.process.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(WAIT)


@pytest.fixture
def twistd(tmp_path: Path) -> Iterator[Callable[..., Twistd]]:
    """Start `twistd socks4 ARGS` (in tmp_path, ready to serve); stopped afterwards."""
    started: list[Twistd] = []

    def start(*args: str) -> Twistd:
        server = Twistd(tmp_path, *args)
        started.append(server)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()
    for server in started:
        assert "Traceback" not in server.output, server.output


def deny_port_then_permit_loopback(port: int) -> str:
    return (
        f"deny 127.0.0.1 255.255.255.255 127.0.0.1 255.255.255.255 eq {port}\n"
        "permit 127.0.0.0 255.0.0.0\n"
    )


# -- 1. decisions and the access log ---------------------------------------------------


def test_rules_deny_one_destination_and_permit_another(tmp_path, echo, twistd):
    denied, permitted = echo(), echo()
    rules = tmp_path / "sockd.conf"
    rules.write_text(deny_port_then_permit_loopback(denied.port))
    server = twistd("--rules", str(rules))

    assert socks_connect(server.port, denied.port) == (ReplyCode.REJECTED, b"")
    assert socks_connect(server.port, permitted.port, payload=b"hello\n") == (
        ReplyCode.GRANTED, b"hello\n",
    )

    deny_line = server.wait_for_line(
        "socksident.access", f" CONNECT {LOOPBACK}:{denied.port} -> 91 "
    )
    assert f"({rules}:1 denies {LOOPBACK})" in deny_line
    permit_line = server.wait_for_line(
        "socksident.access", f" CONNECT {LOOPBACK}:{permitted.port} -> 90 "
    )
    assert f"(permitted by {rules}:2)" in permit_line
    assert " up=6 down=6 " in permit_line


# -- 2. a permit line's command -------------------------------------------------------------


def test_permit_line_command_runs_with_sanitized_substitutions(tmp_path, echo, twistd):
    denied, permitted = echo(), echo()
    out = tmp_path / "commands.out"
    canary = tmp_path / "canary"
    rules = tmp_path / "sockd.conf"
    rules.write_text(
        f"deny 127.0.0.1 255.255.255.255 127.0.0.1 255.255.255.255 eq {denied.port}"
        f" : echo denied %u >> {out}\n"
        f"permit 127.0.0.0 255.0.0.0 : echo %u %c %z %s >> {out}\n"
    )
    server = twistd("--rules", str(rules))
    # A deny line's command is accepted but never runs; twistd says so at load time.
    assert f"{rules}:1: a command on a deny line never runs" in server.stdout

    hostile = f"x;touch {canary} `id`$(id)&|<>'\"*?"
    assert socks_connect(server.port, denied.port, user="mallory") == (ReplyCode.REJECTED, b"")
    assert socks_connect(server.port, permitted.port, user=hostile) == (
        ReplyCode.GRANTED, b"ping\n",
    )

    text = poll(lambda: out.exists() and out.read_text().endswith("\n") and out.read_text(),
                f"the command to write {out}")
    user = f"x_touch_{canary}" + "_" + "_id_" + "__id_" + "_" * 8
    assert text == f"{user} connect {LOOPBACK} {permitted.port}\n"
    assert not canary.exists()
    server.wait_for_line("command", "exited with status 0")
    assert "denied" not in out.read_text()


# -- 3. SIGHUP reloads; a broken file keeps the old rules ----------------------------------


def test_sighup_reloads_and_a_broken_file_keeps_the_old_rules(tmp_path, echo, twistd):
    a, b = echo(), echo()
    rules = tmp_path / "sockd.conf"
    rules.write_text(deny_port_then_permit_loopback(a.port))
    server = twistd("--rules", str(rules))
    assert socks_connect(server.port, a.port)[0] == ReplyCode.REJECTED
    assert socks_connect(server.port, b.port)[0] == ReplyCode.GRANTED

    rules.write_text("# flipped\n" + deny_port_then_permit_loopback(b.port))
    server.hangup()
    poll(lambda: socks_connect(server.port, a.port)[0] == ReplyCode.GRANTED,
         "the reloaded rules to permit A")
    assert socks_connect(server.port, b.port) == (ReplyCode.REJECTED, b"")
    server.wait_for_line(f"rules reloaded from {rules}: 2 lines")
    server.wait_for_line("socksident.access", f":{b.port} -> 91 ({rules}:2 denies {LOOPBACK})")

    rules.write_text("permit 127.0.0.0 255.0.0.0\ndeny 0.0.0.0 0.0.0.0 eq\n")
    server.hangup()
    server.wait_for_line(
        f"rules reload failed, keeping the old rules: {rules}:2: missing port after 'eq'"
    )
    assert server.process.poll() is None, server.output
    assert socks_connect(server.port, a.port)[0] == ReplyCode.GRANTED
    assert socks_connect(server.port, b.port)[0] == ReplyCode.REJECTED
    assert server.stdout.count("rules reloaded from") == 1


# -- 4. a rules file that does not parse -------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("permit 127.0.0.0 255.0.0.0\ndeny 0.0.0.0 0.0.0.0 equal 25\n",
         "2: unknown operator 'equal'; expected one of eq, neq, lt, gt, le, ge"),
        ("# users\n\npermit *=alice,/nonexistent/users 10.0.0.0/8\n",
         "3: cannot read user list '/nonexistent/users': No such file or directory"),
    ],
)
def test_unparsable_rules_stop_twistd(tmp_path, text, message):
    rules = tmp_path / "sockd.conf"
    rules.write_text(text)
    server = Twistd(tmp_path, "--rules", str(rules))
    try:
        code = server.process.wait(30)
    finally:
        server.stop()
    output = server.output
    assert code != 0, output
    assert f"{rules}:{message}" in output
    assert "Traceback" not in output
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, server.port), timeout=IO_TIMEOUT).close()


# -- 5. the tester on the example file (cases tests/test_rules.py leaves out) -----------------


def example_line(prefix: str) -> int:
    lines = EXAMPLE.read_text().splitlines()
    (number,) = [n for n, line in enumerate(lines, 1) if line.startswith(prefix)]
    return number


def run_tester(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "socksident.rules", *args],
        cwd=REPO, capture_output=True, text=True, timeout=30,
    )


@pytest.mark.parametrize(
    "args, status, prefix, decision",
    [
        # The mail relay's SMTP port, denied by a service name, before any ident.
        (["--src", "10.1.2.3", "--dst", "10.1.1.25:25", "--user", "alice", "--ident-user", "alice"],
         1, "deny\t0.0.0.0 0.0.0.0\t\t10.1.1.25", "deny (91): {location} denies 10.1.1.25"),
        # An operator below port 1024 falls through to the management network's deny line.
        (["--src", "10.1.2.3", "--dst", "10.9.0.5:80", "--user", "alice", "--ident-user", "alice"],
         1, "deny\t0.0.0.0 0.0.0.0\t\t10.9.0.0", "deny (91): {location} denies 10.9.0.5"),
        # The lab's IPv6 hosts, with identd confirming the user.
        (["--src", "2001:db8:1::7", "--dst", "192.0.2.80:443", "--user", "carol",
          "--ident-user", "carol"],
         0, "permit\t?=I 2001:db8:1::/48", "permit (90): permitted by {location}"),
    ],
    ids=["smtp-denied", "management-low-port", "ipv6-lab"],
)
def test_tester_on_the_example_file(args, status, prefix, decision):
    run = run_tester(str(EXAMPLE), *args)
    location = f"{EXAMPLE}:{example_line(prefix)}"
    assert run.returncode == status, run.stdout + run.stderr
    assert f"line: {location}: {prefix}" in run.stdout
    assert f"decision: {decision.format(location=location)}\n" in run.stdout


def test_tester_missing_rules_file_exits_2(tmp_path):
    missing = tmp_path / "nonexistent.conf"
    run = run_tester(str(missing), "--src", "10.1.2.3", "--dst", "192.0.2.80:80")
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr == f"{missing}: cannot read the rules file: No such file or directory\n"
