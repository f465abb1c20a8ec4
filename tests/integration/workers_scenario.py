"""`twistd socks4 --workers 2` end to end, in a private network namespace.

Run by tests/integration/test_workers.py as root under ``unshare -n``, so the
proxy can take a fixed port and clients can come from many loopback
addresses (127.0.0.1-127.0.0.12, and fd00::2-fd00::9 on lo).  It starts an
echo server and the real twistd with two workers, a tcp and a tcp6 --port
and a rules file, then, in order:

affinity    three CONNECTs from each client address (IPv6 ones to the tcp6
            port); the access lines say which worker served each one
bind        from each address a CONNECT held open, then a BIND to the same
            destination: both replies must be 90 whichever worker serves it
kill        SIGKILL to worker 0; the parent logs it and starts a new one,
            which serves worker 0's hosts
hangup      the rules file now denies; one SIGHUP to the parent, and every
            worker reloads and refuses (91)
terminate   SIGTERM to the parent: it exits 0 and no worker outlives it
busy        --workers 2 on a port another socket holds stops start-up

It prints one JSON object with what it saw; the test judges it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

PROXY_PORT = 1080
PROXY6_PORT = 1082  # a second --port: tcp6 on ::1
ECHO_PORT = 7
BUSY_PORT = 1081
CLIENTS = [f"127.0.0.{n}" for n in range(1, 13)]
CLIENTS6 = [f"fd00::{n}" for n in range(2, 10)]
WAIT = 20.0
T = TypeVar("T")

PERMIT = "permit 127.0.0.0 255.0.0.0\npermit fd00::/16\n"
DENY = "deny 127.0.0.0 255.0.0.0\n"


def poll(check: Callable[[], T], what: str, timeout: float = WAIT) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(WAIT)
        try:
            while data := self.request.recv(65536):
                self.request.sendall(data)
        except OSError:
            pass


class EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def request(command: int, port: int, address: str, user: bytes = b"tester") -> bytes:
    return bytes([4, command]) + port.to_bytes(2, "big") + socket.inet_aton(address) + user + b"\0"


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return out


def open_client(source: str) -> socket.socket:
    """A connection to the proxy from `source`: tcp on 127.0.0.1, or tcp6 on ::1."""
    ipv6 = ":" in source
    sock = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    sock.bind((source, 0))
    sock.connect(("::1", PROXY6_PORT) if ipv6 else ("127.0.0.1", PROXY_PORT))
    return sock


def connect_once(source: str, token: bytes) -> dict[str, Any]:
    """One CONNECT to the echo server: the reply code and whether data echoed."""
    with open_client(source) as sock:
        port = sock.getsockname()[1]
        sock.sendall(request(1, ECHO_PORT, "127.0.0.1"))
        code = recv_exactly(sock, 8)[1]
        echoed = False
        if code == 90:
            sock.sendall(token)
            echoed = recv_exactly(sock, len(token)) == token
            sock.shutdown(socket.SHUT_WR)
            sock.recv(10)
        return {"source": source, "port": port, "code": code, "echoed": echoed}


def bind_after_connect(source: str) -> dict[str, Any]:
    """CONNECT held open, then BIND: the two replies and the data both ways."""
    with open_client(source) as primary, open_client(source) as control:
        primary.sendall(request(1, ECHO_PORT, "127.0.0.1"))
        connect_code = recv_exactly(primary, 8)[1]
        control.sendall(request(2, ECHO_PORT, "127.0.0.1"))
        first = recv_exactly(control, 8)
        result: dict[str, Any] = {"source": source, "connect": connect_code,
                                  "first": first[1], "second": None}
        if first[1] != 90:
            return result
        bind_port = int.from_bytes(first[2:4], "big")
        with socket.create_connection(("127.0.0.1", bind_port), timeout=WAIT) as app:
            second = recv_exactly(control, 8)
            result["second"] = second[1]
            app.sendall(b"down")
            result["down"] = recv_exactly(control, 4) == b"down"
        return result


class Twistd:
    def __init__(self, workdir: Path, *args: str) -> None:
        self.out = workdir / f"twistd-{len(list(workdir.glob('twistd-*')))}.log"
        twistd = str(Path(sys.executable).with_name("twistd"))
        with open(self.out, "wb") as out:
            self.process = subprocess.Popen(
                [twistd, "-n", "--pidfile=", "socks4", *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=workdir,
            )

    @property
    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def lines(self, *parts: str) -> list[str]:
        return [line for line in self.text.splitlines() if all(p in line for p in parts)]

    def serving(self, worker: int, after: int = 0) -> list[int]:
        """Pids of worker `worker` that logged they are serving (from line `after`)."""
        pattern = re.compile(rf"worker {worker} \(pid (\d+)\) serving")
        found = []
        for line in self.text.splitlines()[after:]:
            match = pattern.search(line)
            if match:
                found.append(int(match.group(1)))
        return found

    def alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"twistd exited with {self.process.returncode}:\n{self.text}")


def access_workers(proxy: Twistd) -> dict[str, int]:
    """client "host:port" -> the worker whose access line names it."""
    pattern = re.compile(r"\[socksident\.access#info worker (\d+)\] (\S+) ")
    served = {}
    for line in proxy.text.splitlines():
        match = pattern.search(line)
        if match:
            served[match.group(2)] = int(match.group(1))
    return served


def pid_exists(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def run(workdir: Path) -> dict[str, Any]:
    report: dict[str, Any] = {}
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    for source in CLIENTS6:
        subprocess.run(["ip", "-6", "addr", "add", f"{source}/128", "dev", "lo", "nodad"],
                       check=True)
    echo = EchoServer(("127.0.0.1", ECHO_PORT), _Echo)
    threading.Thread(target=echo.serve_forever, args=(0.05,), daemon=True).start()
    rules = workdir / "sockd.conf"
    rules.write_text(PERMIT)
    proxy = Twistd(workdir, "--workers", "2", "--port",
                   f"tcp:{PROXY_PORT}:interface=127.0.0.1", "--port",
                   f"tcp6:{PROXY6_PORT}:interface=\\:\\:1", "--rules", str(rules))
    try:
        pids = {}
        for worker in (0, 1):
            pids[worker] = poll(lambda: proxy.alive() or proxy.serving(worker),
                                f"worker {worker} to serve")[0]
        report["pids"] = pids
        report["parent"] = proxy.process.pid

        # affinity
        connects = [connect_once(source, f"{source}-{n}".encode())
                    for n in range(3) for source in CLIENTS + CLIENTS6]
        poll(lambda: len(access_workers(proxy)) >= len(connects), "an access line per CONNECT")
        served = access_workers(proxy)
        report["affinity"] = [dict(c, worker=served.get(f"{c['source']}:{c['port']}"))
                              for c in connects]

        # bind after connect
        report["bind"] = [bind_after_connect(source) for source in CLIENTS]

        # kill worker 0
        mark = len(proxy.text.splitlines())
        os.kill(pids[0], signal.SIGKILL)
        restarted = poll(lambda: proxy.alive() or proxy.serving(0, after=mark),
                         "worker 0 to be restarted")[0]
        report["restarted_pid"] = restarted
        report["restart_lines"] = proxy.lines("worker 0", f"pid {pids[0]}", "restarting")
        from socksident.reuseport import worker_for

        zero_hosts = [s for s in CLIENTS if worker_for(s, 2) == 0]
        report["after_restart"] = [connect_once(s, b"again") for s in zero_hosts[:2]]
        poll(lambda: all(f"{c['source']}:{c['port']}" in access_workers(proxy)
                         for c in report["after_restart"]), "the access lines after restart")
        served = access_workers(proxy)
        for c in report["after_restart"]:
            c["worker"] = served[f"{c['source']}:{c['port']}"]

        # hangup
        rules.write_text(DENY)
        mark = len(proxy.text.splitlines())
        proxy.process.send_signal(signal.SIGHUP)

        def reloaded() -> list[str]:
            proxy.alive()
            lines = [line for line in proxy.text.splitlines()[mark:]
                     if "rules reloaded" in line]
            return lines if len(lines) >= 2 else []

        report["reload_lines"] = poll(reloaded, "both workers to reload")
        refused = [connect_once(source, b"no") for source in CLIENTS]
        poll(lambda: all(f"{c['source']}:{c['port']}" in access_workers(proxy)
                         for c in refused), "the access lines after reload")
        served = access_workers(proxy)
        report["after_reload"] = [dict(c, worker=served[f"{c['source']}:{c['port']}"])
                                  for c in refused]

        # terminate
        all_pids = [pids[0], pids[1], restarted]
        proxy.process.send_signal(signal.SIGTERM)
        report["exit_status"] = proxy.process.wait(WAIT)
        report["alive_after_exit"] = [pid for pid in all_pids if pid_exists(pid)]
        report["stop_lines"] = proxy.lines("stopped:")
    finally:
        if proxy.process.poll() is None:
            proxy.process.kill()
            proxy.process.wait()
        report["log"] = proxy.text

    # a busy port
    holder = socket.socket()
    holder.bind(("127.0.0.1", BUSY_PORT))
    holder.listen(1)
    busy = Twistd(workdir, "--workers", "2", "--port", f"tcp:{BUSY_PORT}:interface=127.0.0.1")
    try:
        report["busy_status"] = busy.process.wait(WAIT)
    finally:
        if busy.process.poll() is None:
            busy.process.kill()
            busy.process.wait()
        holder.close()
    report["busy_log"] = busy.text
    echo.shutdown()
    return report


def main() -> int:
    workdir = Path(sys.argv[1])
    try:
        report = run(workdir)
    except Exception as error:  # the test shows it with whatever was logged
        import traceback

        report = {"error": "".join(traceback.format_exception(error))}
        logs = sorted(workdir.glob("twistd-*.log"))
        report["log"] = "\n".join(p.read_text(errors="replace") for p in logs)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
