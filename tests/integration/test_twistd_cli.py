"""`twistd socks4` start-up as an administrator meets it: reactor choice and port errors."""

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from .conftest import unused_port

TWISTD = Path(sys.executable).parent / "twistd"


def twistd(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    if not TWISTD.exists():
        pytest.fail(f"no twistd next to {sys.executable}: is the package installed?")
    pidfile = [] if any(a.startswith("--pidfile") for a in args) else ["--pidfile="]
    return subprocess.run(
        [str(TWISTD), "-n", *pidfile, *args],
        capture_output=True, text=True, timeout=timeout,
    )


def test_the_reactor_twistd_was_told_to_use_is_the_one_serving():
    """Our options parse endpoints with the reactor twistd installed for --reactor."""
    port = unused_port()
    process = subprocess.Popen(
        [str(TWISTD), "-n", "--pidfile=", "--reactor=poll", "socks4",
         "--port", f"tcp:{port}:interface=127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    # Reading stops at the latest when this kills a twistd that hangs silent.
    watchdog = threading.Timer(20, process.kill)
    watchdog.start()
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "listening on" in line or "Traceback" in line:
                break
        output = "".join(lines)
        assert "reactor class: twisted.internet.pollreactor.PollReactor" in output
        assert f"listening on tcp:{port}:interface=127.0.0.1" in output
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        watchdog.cancel()
        process.kill()
        process.wait(timeout=10)


def test_an_endpoint_that_does_not_parse_is_a_usage_error():
    run = twistd("socks4", "--port", "bogus:1")
    assert run.returncode == 1
    # twistd prints the usage text and then the error, both on standard output.
    assert run.stdout.strip().splitlines()[-1].endswith(
        "--port 'bogus:1': Unknown endpoint type: 'bogus'"
    )
    assert "Traceback" not in run.stdout + run.stderr


def test_a_port_in_use_stops_start_up_naming_it(tmp_path):
    pidfile = tmp_path / "twistd.pid"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        run = twistd(f"--pidfile={pidfile}", "socks4", "--port", f"tcp:{port}:interface=127.0.0.1")
    assert run.returncode == 1
    output = run.stdout + run.stderr
    assert f"ListenError: --port tcp:{port}:interface=127.0.0.1: [Errno 98]" in output
    assert "listening on" not in output
    assert not pidfile.exists()


def test_a_daemon_whose_port_is_in_use_reports_it_and_exits(tmp_path):
    """The waiting parent must hear of the failure, not wait for ever."""
    pidfile, logfile = tmp_path / "twistd.pid", tmp_path / "twistd.log"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        run = subprocess.run(
            [str(TWISTD), f"--pidfile={pidfile}", f"--logfile={logfile}", "socks4",
             "--port", f"tcp:{port}:interface=127.0.0.1"],
            capture_output=True, text=True, timeout=60,
        )
    assert run.returncode == 1
    assert f"ListenError: --port tcp:{port}:interface=127.0.0.1" in run.stdout + run.stderr
    assert not pidfile.exists()
