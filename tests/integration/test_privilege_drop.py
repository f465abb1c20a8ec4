"""`twistd --uid/--gid`: bind a port below 1024 as root, then serve as another user.

In a private network namespace (port 80 without touching the machine):
twistd binds, drops to nobody (65534), serves a CONNECT, and on SIGHUP
re-reads its rules as that user, which the README's example relies on.
Needs root, unshare (util-linux), nsenter (util-linux) and ip (iproute2).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from .conftest import skip_unless_strict

SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
NOBODY = 65534
WAIT = 20.0

# Run inside the namespace: a destination on a free port, one CONNECT to it
# through the proxy on port 80; prints the reply code.
CLIENT = r"""
import socket
dest = socket.socket(); dest.bind(("127.0.0.1", 0)); dest.listen(1)
port = dest.getsockname()[1]
with socket.create_connection(("127.0.0.1", 80), timeout=20) as sock:
    sock.sendall(b"\x04\x01" + port.to_bytes(2, "big") + socket.inet_aton("127.0.0.1") + b"u\0")
    reply = sock.recv(8)
print(reply[1] if len(reply) == 8 else -1)
"""


def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT:g} s waiting for {what}")
        time.sleep(0.05)


def test_binds_port_80_as_root_then_serves_and_reloads_as_nobody(tmp_path):
    if os.geteuid() != 0:
        skip_unless_strict("binding port 80 and dropping privileges needs root")
    for tool, package in (("unshare", "util-linux"), ("nsenter", "util-linux"),
                          ("ip", "iproute2")):
        if shutil.which(tool, path=SEARCH_PATH) is None:
            skip_unless_strict(f"needs {tool} ({package})")
    # pytest's tmp_path is root's alone: the rules must be readable by nobody
    shared = Path(tempfile.mkdtemp(prefix="socksident-uid-"))
    shared.chmod(0o755)
    rules = shared / "sockd.conf"
    rules.write_text("permit 127.0.0.0/8\n")
    rules.chmod(0o644)
    twistd = str(Path(sys.executable).with_name("twistd"))
    log = tmp_path / "twistd.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
             twistd, "-n", "--pidfile=", "--logfile=-", "--uid", str(NOBODY),
             "--gid", str(NOBODY), "socks4", "--port", "tcp:80:interface=127.0.0.1",
             "--rules", str(rules)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(os.environ, PATH=SEARCH_PATH),
        )
    text = lambda: log.read_text(errors="replace")  # noqa: E731

    def connect() -> int:
        done = subprocess.run(
            ["nsenter", "-t", str(process.pid), "-n", sys.executable, "-c", CLIENT],
            capture_output=True, text=True, timeout=WAIT, env=dict(os.environ, PATH=SEARCH_PATH))
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    try:
        wait_for(lambda: process.poll() is not None or "server listening on" in text(),
                 "twistd to listen")
        assert process.poll() is None, text()
        status = Path(f"/proc/{process.pid}/status").read_text()
        uid = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid.split()[1:] == [str(NOBODY)] * 4, uid  # real, effective, saved, fs
        assert connect() == 90, text()
        rules.write_text("deny 127.0.0.0/8\n")
        process.send_signal(signal.SIGHUP)
        wait_for(lambda: "rules reloaded from" in text(), "the reload as nobody")
        assert connect() == 91, text()
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(WAIT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(shared, ignore_errors=True)
    assert "Traceback" not in text(), text()
