"""contrib/systemd: the service's own command line, started the way systemd starts it.

The test reads ExecStart from socksident.service and the socket from
socksident.socket, so the files and the test cannot drift apart.  It then
does what systemd does on socket activation: the parent creates and binds
the listening socket, the child gets it as descriptor 3 with
``LISTEN_FDS=1``, ``LISTEN_FDNAMES`` from ``FileDescriptorName=`` and
``LISTEN_PID`` set to its own pid (a shell sets ``LISTEN_PID=$$`` and
execs, as systemd sets it between fork and exec).  A SOCKS CONNECT goes
through the inherited socket; ExecReload, run as written with ``$MAINPID``,
reloads the rules (logged), and the next request is refused by them;
SIGUSR1, as the README's logrotate stanza sends it, reopens the access log.

Two substitutions only, each checked: the twistd of this test's
environment for the unit's path, and a temporary directory for
/etc/socksident and /var/log/socksident.  The socket is bound to the unit's
address with port 0 (a fixed port would need a namespace); its port is the
one thing of the .socket file not exercised.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from .conftest import skip_unless_strict

UNITS = Path(__file__).resolve().parents[2] / "contrib" / "systemd"
WAIT = 20.0


def unit_settings(path: Path) -> dict[str, list[str]]:
    """KEY -> every value it is given, across sections (the unit files' syntax)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;[":
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


SERVICE = unit_settings(UNITS / "socksident.service")
SOCKET = unit_settings(UNITS / "socksident.socket")


def exec_start() -> list[str]:
    (line,) = SERVICE["ExecStart"]
    assert line[0] not in "-@+!:", "a prefixed ExecStart would change how it runs"
    return shlex.split(line)


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT:g} s waiting for {what}")
        time.sleep(0.05)


def echo_server() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                while data := connection.recv(65536):
                    connection.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return server


def connect(proxy: tuple[str, int], port: int) -> tuple[int, bytes]:
    """One CONNECT to 127.0.0.1:`port`: the reply code and what came back."""
    with socket.create_connection(proxy, timeout=WAIT) as sock:
        sock.sendall(b"\x04\x01" + port.to_bytes(2, "big") + socket.inet_aton("127.0.0.1")
                     + b"tester\0")
        reply = b""
        while len(reply) < 8:
            chunk = sock.recv(8 - len(reply))
            if not chunk:
                return -1, reply
            reply += chunk
        if reply[1] != 90:
            return reply[1], b""
        sock.sendall(b"through the unit\n")
        sock.shutdown(socket.SHUT_WR)
        back = b""
        while chunk := sock.recv(65536):
            back += chunk
        return reply[1], back


def test_the_units_agree_with_each_other():
    (name,) = SOCKET["FileDescriptorName"]
    argv = exec_start()
    ports = [argv[i + 1] for i, a in enumerate(argv) if a == "--port"]
    assert ports == [f"systemd:domain=INET:name={name}"]
    assert argv[1:4] == ["--nodaemon", "--pidfile=", "--logfile=-"]  # journald, no pid file
    assert SERVICE["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert SERVICE["DynamicUser"] == ["yes"]
    assert SERVICE["ConfigurationDirectory"] == ["socksident"]  # /etc/socksident
    assert SERVICE["Requires"] == ["socksident.socket"]
    assert argv[argv.index("--rules") + 1].startswith("/etc/socksident/")


def test_exec_start_serves_on_the_socket_systemd_passes_and_reloads_on_exec_reload(tmp_path):
    echo = echo_server()
    (name,) = SOCKET["FileDescriptorName"]
    (listen,) = SOCKET["ListenStream"]
    host, _, _ = listen.rpartition(":")
    (backlog,) = SOCKET["Backlog"]

    argv = exec_start()
    assert Path(argv[0]).name == "twistd"
    argv[0] = str(Path(sys.executable).with_name("twistd"))
    replaced = {"/etc/socksident/": f"{tmp_path}/etc/", "/var/log/socksident/": f"{tmp_path}/log/"}
    for index, argument in enumerate(argv):
        for unit_path, here in replaced.items():
            if argument.startswith(unit_path):
                argv[index] = here + argument[len(unit_path):]
    assert not [a for a in argv if "/etc/" in a and str(tmp_path) not in a]
    (tmp_path / "etc").mkdir()
    (tmp_path / "log").mkdir()
    rules = Path(argv[argv.index("--rules") + 1])
    rules.write_text("permit 127.0.0.0/8\n")
    access_log = Path(argv[argv.index("--access-log") + 1])

    # What systemd does for socksident.socket: bind and listen in the parent.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, 0))
    listener.listen(int(backlog))
    proxy = listener.getsockname()

    def as_fd_3() -> None:
        os.dup2(listener.fileno(), 3)  # dup2 leaves the copy inheritable

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "COV"))}
    env.update(LISTEN_FDS="1", LISTEN_FDNAMES=name, PYTHONDONTWRITEBYTECODE="1")
    out = tmp_path / "journal.log"
    with open(out, "wb") as journal:
        # systemd sets LISTEN_PID to the pid it is about to exec: so does the shell.
        process = subprocess.Popen(
            ["/bin/sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *argv],
            env=env, stdin=subprocess.DEVNULL, stdout=journal, stderr=subprocess.STDOUT,
            preexec_fn=as_fd_3, pass_fds=(3,), cwd=tmp_path,
        )
    listener.close()  # only the service holds it now, as under systemd
    text = lambda: out.read_text(errors="replace")  # noqa: E731
    try:
        wait_for(lambda: process.poll() is not None or "server listening on" in text(),
                 "the service to start")
        assert process.poll() is None, text()

        code, back = connect(proxy, echo.getsockname()[1])
        assert (code, back) == (90, b"through the unit\n"), text()

        rules.write_text("deny 127.0.0.0/8\n")
        (reload,) = SERVICE["ExecReload"]
        subprocess.run(["/bin/sh", "-c", reload], env=dict(env, MAINPID=str(process.pid)),
                       check=True, timeout=WAIT)
        wait_for(lambda: "rules reloaded from" in text(), "the rules reload")
        assert connect(proxy, echo.getsockname()[1]) == (91, b""), text()

        wait_for(lambda: access_log.exists() and len(access_log.read_text().splitlines()) >= 2,
                 "two access records")
        records = [json.loads(line) for line in access_log.read_text().splitlines()]
        assert [r["code"] for r in records] == [90, 91]
        assert {r["listener"] for r in records} == {f"{proxy[0]}:{proxy[1]}"}

        # logrotate's postrotate (README): rename, then SIGUSR1 to the main pid
        access_log.rename(access_log.with_suffix(".json.1"))
        os.kill(process.pid, signal.SIGUSR1)
        wait_for(access_log.exists, "the access log to be reopened")
        assert connect(proxy, echo.getsockname()[1]) == (91, b""), text()
        wait_for(lambda: access_log.read_text().count("\n") == 1, "a record in the new file")
        assert process.poll() is None, text()  # SIGUSR1 under --logfile=- is no death
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(WAIT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        echo.close()
    # twistd ends by re-raising SIGTERM, which systemd counts as a clean stop
    assert process.returncode in (0, -signal.SIGTERM), text()
    assert "Server Shut Down." in text(), text()
    assert "Traceback" not in text(), text()


def test_systemd_reads_every_line_of_the_units(tmp_path):
    """`systemd-analyze verify` knows every key (a misspelt hardening option
    would be ignored with a warning) and finds the command it runs."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        skip_unless_strict("needs systemd-analyze (Debian package systemd)")
    twistd = str(Path(sys.executable).with_name("twistd"))
    for unit in ("socksident.socket", "socksident.service"):
        text = (UNITS / unit).read_text()
        (tmp_path / unit).write_text(text.replace(exec_start()[0], twistd))
    done = subprocess.run(
        [analyze, "verify", str(tmp_path / "socksident.socket"),
         str(tmp_path / "socksident.service")],
        capture_output=True, text=True, timeout=60,
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
