"""The soak: one real twistd socks4 serving a mix of requests, many times, in a namespace.

Run by tests/integration/test_soak.py as root under ``unshare -n`` (it refuses
to run in the namespace it was started from, as it binds port 113).  It
brings ``lo`` up and starts oidentd on 127.0.0.1:113, destinations in a
child process (an echo server, and a second echo server whose rules line
requires ident), and one ``twistd socks4 --rules`` with
``--bind-without-connect``.  Then client threads run the mix, kind after
kind, until REQUESTS requests were made:

CONNECT with data, a refused port (91), SOCKS4A by name, an unresolvable
name (91), a bad version, half a request then close, an unknown command
(91), a reset right after the reply, BIND (both replies, data both ways),
ident against oidentd (90), refused by the rules (91).

It measures the server's descriptors and RSS after a warm-up and after the
run (once every connection is closed), checks every access line arrived,
and prints one JSON object on stdout.  Every wait has a deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from twistd_server import TwistdServer, wait_for  # noqa: E402

LOOPBACK = "127.0.0.1"
IDENT_PORT = 113
REFUSED_PORT = 9  # nothing listens on it
DENIED_PORT = 7  # the rules deny it
THREADS = 4

DESTINATIONS = r"""
import asyncio, sys
async def echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()
async def main():
    a = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=1024)
    b = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=1024)
    print(a.sockets[0].getsockname()[1], b.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""

OIDENTD_CONF = """\
default {
	default {
		deny spoof
		deny spoof_all
		deny random
		deny hide
	}
}
"""


def request(command: int, port: int, ip: str, user: bytes = b"", host: bytes = b"") -> bytes:
    packed = socket.inet_aton("0.0.0.1" if host else ip)
    tail = host + b"\x00" if host else b""
    return bytes([4, command]) + struct.pack(">H", port) + packed + user + b"\x00" + tail


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise AssertionError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return out


def recv_eof(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


class Mix:
    """The kinds of request, each a function of a fresh client socket."""

    def __init__(self, proxy: int, echo: int, ident_echo: int) -> None:
        self.proxy, self.echo, self.ident_echo = proxy, echo, ident_echo
        self.kinds: list[tuple[str, Callable[[], None]]] = [
            ("connect_data", self.connect_data),
            ("refused_port", lambda: self.refused(request(1, REFUSED_PORT, LOOPBACK))),
            ("socks4a", self.socks4a),
            ("unresolvable", lambda: self.refused(request(1, 80, "", b"", b"nowhere.invalid"))),
            ("bad_version", self.bad_version),
            ("half_request", self.half_request),
            ("unknown_command", lambda: self.refused(request(9, 80, LOOPBACK))),
            ("reset_after_reply", self.reset_after_reply),
            ("bind", self.bind),
            ("ident", self.ident),
            ("rules_refused", lambda: self.refused(request(1, DENIED_PORT, LOOPBACK))),
        ]

    def client(self) -> socket.socket:
        return socket.create_connection((LOOPBACK, self.proxy), timeout=20)

    def granted(self, sock: socket.socket, wire: bytes) -> bytes:
        sock.sendall(wire)
        reply = recv_exactly(sock, 8)
        assert reply[1] == 90, reply
        return reply

    def echo_through(self, wire: bytes) -> None:
        with self.client() as sock:
            self.granted(sock, wire)
            payload = os.urandom(1024)
            sock.sendall(payload)
            assert recv_exactly(sock, len(payload)) == payload
            sock.shutdown(socket.SHUT_WR)
            assert recv_eof(sock) == b""

    def connect_data(self) -> None:
        self.echo_through(request(1, self.echo, LOOPBACK, b"soak"))

    def socks4a(self) -> None:
        self.echo_through(request(1, self.echo, "", b"soak", b"localhost"))

    def ident(self) -> None:
        self.echo_through(request(1, self.ident_echo, LOOPBACK, b"root"))

    def refused(self, wire: bytes) -> None:
        with self.client() as sock:
            sock.sendall(wire)
            reply = recv_eof(sock)
            assert len(reply) == 8 and reply[1] == 91, reply

    def bad_version(self) -> None:
        with self.client() as sock:
            sock.sendall(b"\x07\x01\x00\x50\x7f\x00\x00\x01\x00")
            recv_eof(sock)

    def half_request(self) -> None:
        with self.client() as sock:
            sock.sendall(b"\x04\x01\x00")

    def reset_after_reply(self) -> None:
        sock = self.client()
        self.granted(sock, request(1, self.echo, LOOPBACK))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def bind(self) -> None:
        with self.client() as sock:
            first = self.granted(sock, request(2, 0, LOOPBACK, b"soak"))
            port = struct.unpack(">H", first[2:4])[0]
            with socket.create_connection((LOOPBACK, port), timeout=20) as server:
                assert recv_exactly(sock, 8)[1] == 90
                server.sendall(b"from the server")
                assert recv_exactly(sock, 15) == b"from the server"
                sock.sendall(b"from the client")
                assert recv_exactly(server, 15) == b"from the client"
            assert recv_eof(sock) == b""


def drive(mix: Mix, count: int, errors: list[str]) -> dict[str, int]:
    """`count` requests over THREADS threads, kind after kind."""
    done: dict[str, int] = {name: 0 for name, _ in mix.kinds}
    lock = threading.Lock()
    counter = iter(range(count))

    def work() -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            name, run = mix.kinds[index % len(mix.kinds)]
            try:
                run()
            except Exception as error:  # a failed request is a finding, not a crash
                with lock:
                    errors.append(f"{name}: {error!r}")
            with lock:
                done[name] += 1

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return done


def run(requests: int, warmup: int, oidentd: str) -> dict:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
    workdir = Path(tempfile.mkdtemp(prefix="socksident-soak-"))
    workdir.chmod(0o755)
    conf = workdir / "oidentd.conf"
    conf.write_text(OIDENTD_CONF)
    conf.chmod(0o644)
    procs: list[subprocess.Popen] = []
    server = None
    try:
        ident = subprocess.Popen(
            [oidentd, "-i", "-S", "-C", str(conf), "-a", LOOPBACK, "-p", str(IDENT_PORT)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        procs.append(ident)
        destinations = subprocess.Popen([sys.executable, "-c", DESTINATIONS],
                                        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        procs.append(destinations)
        assert destinations.stdout is not None
        echo, ident_echo = map(int, destinations.stdout.readline().split())
        rules = workdir / "sockd.conf"
        rules.write_text(
            f"deny 0.0.0.0 0.0.0.0 0.0.0.0 0.0.0.0 eq {DENIED_PORT}\n"
            f"permit ?=I 127.0.0.0 255.0.0.0 127.0.0.1 255.255.255.255 eq {ident_echo}\n"
            "permit 127.0.0.0 255.0.0.0\n"
        )

        def ident_up() -> bool:
            try:
                socket.create_connection((LOOPBACK, IDENT_PORT), timeout=1).close()
                return True
            except OSError:
                return False

        wait_for(ident_up, 20, "oidentd")
        server = TwistdServer(workdir, ["--rules", str(rules), "--bind-without-connect",
                                        "--request-timeout", "10", "--ident-timeout", "5"])
        mix = Mix(server.port, echo, ident_echo)
        errors: list[str] = []
        drive(mix, warmup, errors)
        wait_for(lambda: len(server.access_lines()) >= warmup, 60, "the warm-up's records", 0.2)
        time.sleep(1)  # let the warm-up's closing handshakes end before the baseline
        before = {"fds": server.descriptors(), "rss_kib": server.rss_kib()}
        started, cpu = time.monotonic(), server.cpu_seconds()
        done = drive(mix, requests, errors)
        elapsed = time.monotonic() - started
        cpu = server.cpu_seconds() - cpu
        total = warmup + requests
        wait_for(lambda: len(server.access_lines()) >= total, 120, "every access record", 1.0)
        wait_for(lambda: server.descriptors() <= before["fds"], 60,
                 "the descriptors back to the baseline", 0.5)
        after = {"fds": server.descriptors(), "rss_kib": server.rss_kib()}
        lines = server.access_lines()
        return {
            "requests": requests,
            "warmup": warmup,
            "kinds": done,
            "errors": errors[:20],
            "error_count": len(errors),
            "seconds": round(elapsed, 1),
            "server_cpu_seconds": round(cpu, 1),
            "before": before,
            "after": after,
            "access_lines": len(lines),
            "codes": {code: sum(f" -> {code} " in line for line in lines)
                      for code in ("90", "91", "92", "93", "-")},
            "ident_answers": sum("ident=user:'root'" in line for line in lines),
            "poison": server.poison()[:20],
        }
    finally:
        if server is not None:
            server.stop()
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=550)
    parser.add_argument("--oidentd", required=True)
    parser.add_argument("--parent-netns", required=True)
    options = parser.parse_args()
    if os.readlink("/proc/self/ns/net") == options.parent_netns:
        print("still in the parent's network namespace: run me under unshare -n",
              file=sys.stderr)
        return 2
    print(json.dumps(run(options.requests, options.warmup, options.oidentd)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
